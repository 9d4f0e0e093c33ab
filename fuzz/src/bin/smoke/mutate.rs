//! A small deterministic mutator: xorshift64* randomness and the usual byte-level
//! operations (bit flips, interesting integers, inserts, deletes, copies, dictionary
//! tokens, splices with another corpus entry). Same seed, same corpus, same mutants.

/// xorshift64* (Vigna): fast, and good enough to choose mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // The state must not be zero; mix the seed so nearby seeds diverge at once.
        Rng(splitmix(seed) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`; `n` must be positive.
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        (self.next() % n as u64) as usize
    }

    pub fn coin(&mut self) -> bool {
        self.next() & 1 == 0
    }
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Values that sit on boundaries: zero, signs, powers of two, the protocol's bounds.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x1ff,
    0x200,
    0xfff,
    0x1000,
    0x1001,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x10_0000,
    0x40_0000,
    0x41_0000,
    0x41_0001,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Applies one to eight stacked mutations to `data`, keeping it at most `max_len`.
pub fn mutate(
    data: &mut Vec<u8>,
    corpus: &[Vec<u8>],
    dictionary: &[&[u8]],
    max_len: usize,
    rng: &mut Rng,
) {
    let rounds = 1 << rng.below(4);
    for _ in 0..rounds {
        one(data, corpus, dictionary, rng);
    }
    data.truncate(max_len);
}

fn one(data: &mut Vec<u8>, corpus: &[Vec<u8>], dictionary: &[&[u8]], rng: &mut Rng) {
    if data.is_empty() {
        let n = 1 + rng.below(64);
        data.extend((0..n).map(|_| rng.next() as u8));
        return;
    }
    let len = data.len();
    match rng.below(12) {
        0 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        1 => {
            let at = rng.below(len);
            data[at] = rng.next() as u8;
        }
        2 => {
            let mut value = INTERESTING[rng.below(INTERESTING.len())];
            if rng.below(4) == 0 {
                value = value.wrapping_neg();
            }
            let width = [1, 2, 4, 8][rng.below(4)];
            let le = value.to_le_bytes();
            let mut field = le[..width].to_vec();
            if rng.below(4) == 0 {
                field.reverse();
            }
            let at = rng.below(len);
            let n = width.min(len - at);
            data[at..at + n].copy_from_slice(&field[..n]);
        }
        3 => {
            // Small arithmetic on a little-endian u8/u32: off-by-one lengths and counts.
            let delta = 1 + rng.below(16) as u32;
            let at = rng.below(len);
            if at + 4 <= len && rng.coin() {
                let v = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                let v = if rng.coin() {
                    v.wrapping_add(delta)
                } else {
                    v.wrapping_sub(delta)
                };
                data[at..at + 4].copy_from_slice(&v.to_le_bytes());
            } else if rng.coin() {
                data[at] = data[at].wrapping_add(delta as u8);
            } else {
                data[at] = data[at].wrapping_sub(delta as u8);
            }
        }
        4 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(128));
            data.drain(at..at + n);
        }
        5 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(32);
            let bytes: Vec<u8> = if rng.coin() {
                (0..n).map(|_| rng.next() as u8).collect()
            } else {
                vec![rng.next() as u8; n * 8]
            };
            data.splice(at..at, bytes);
        }
        6 => {
            // Duplicate a chunk somewhere else: repeated records, frames, TOML lines.
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(512));
            let chunk = data[from..from + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        7 => {
            let from = rng.below(len);
            let to = rng.below(len);
            let n = 1 + rng.below((len - from).min(len - to).min(64));
            data.copy_within(from..from + n, to);
        }
        8 | 9 if !dictionary.is_empty() => {
            let token = dictionary[rng.below(dictionary.len())];
            let at = rng.below(len + 1);
            if rng.coin() || at + token.len() > len {
                data.splice(at..at, token.iter().copied());
            } else {
                data[at..at + token.len()].copy_from_slice(token);
            }
        }
        10 if !corpus.is_empty() => {
            let other = &corpus[rng.below(corpus.len())];
            if !other.is_empty() {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
        }
        _ => {
            if rng.coin() {
                data.truncate(rng.below(len));
            } else {
                data.resize(len + 1 + rng.below(64), 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_mutants() {
        let corpus = vec![b"hello world".to_vec(), vec![0; 100]];
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut data = corpus[0].clone();
            for _ in 0..1000 {
                mutate(&mut data, &corpus, &[b"tok"], 256, &mut rng);
            }
            data
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
