//! One served disk as its NBD connections see it: what every connection to the disk
//! shares, whichever engine runs its requests.

use super::gate::WriteGate;
use super::handshake::ExportInfo;
use crate::backing::{Backing, IoEngine};
use crate::tracker::Tracker;

/// One served disk: what every connection to it shares.
#[derive(Debug)]
pub struct Export {
    pub info: ExportInfo,
    pub backing: Backing,
    pub tracker: Tracker,
    /// The write gate and the frozen epoch, if any. Every command that changes the
    /// image is inside it from copy-before-write to the completion of its write; a
    /// freeze drains it, which waits for the writes in flight.
    pub gate: WriteGate,
    /// The engine connections use: [`IoEngine::Uring`] or [`IoEngine::Sync`], resolved
    /// at start (never `Auto`).
    pub engine: IoEngine,
}

impl Export {
    pub fn new(info: ExportInfo, backing: Backing, tracker: Tracker, engine: IoEngine) -> Export {
        Export {
            info,
            backing,
            tracker,
            gate: WriteGate::new(),
            engine,
        }
    }
}
