//! Cross-thread throughput of `ferry_ringbuf::spsc` carrying `u64` descriptors.
//!
//! One producer thread pushes, the bench thread pops; the time covers moving every
//! item and the consumer seeing the last one. Three ways of waiting are measured:
//! busy retry (`push`/`pop` with a spin hint), the blocking helpers
//! (`push_wait`/`pop_wait`), and the blocking helpers on a small ring, where both
//! sides sleep often and the park/unpark path dominates.
//!
//! Run: `cargo bench -p ferry-ringbuf -- --warm-up-time 1 --measurement-time 2`.

use std::hint::black_box;
use std::thread;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_ringbuf::spsc::{channel, Consumer, Producer, PushError};

/// Descriptors moved per criterion iteration: enough that thread start-up (tens of
/// microseconds) is well under 1% of an iteration.
const ITEMS_PER_ITER: u64 = 1 << 16;

/// Ring capacity of the data plane's descriptor queues, in slots.
const QUEUE_CAPACITY: usize = 1024;
/// A ring small enough that the producer fills it within a few spin rounds.
const SMALL_CAPACITY: usize = 8;

fn push_spinning(producer: &mut Producer<u64>, mut value: u64) {
    while let Err(PushError::Full(back)) = producer.push(value) {
        value = back;
        std::hint::spin_loop();
    }
}

fn pop_spinning(consumer: &mut Consumer<u64>) -> u64 {
    loop {
        if let Some(value) = consumer.pop() {
            return value;
        }
        std::hint::spin_loop();
    }
}

/// Moves `items` descriptors from a spawned producer to the calling thread.
fn transfer(capacity: usize, items: u64, blocking: bool) {
    let (mut producer, mut consumer) = channel::<u64>(capacity);
    thread::scope(|s| {
        s.spawn(move || {
            for value in 0..items {
                if blocking {
                    producer.push_wait(value).expect("consumer alive");
                } else {
                    push_spinning(&mut producer, value);
                }
            }
        });
        let mut sum = 0u64;
        for _ in 0..items {
            sum = sum.wrapping_add(if blocking {
                consumer
                    .pop_wait()
                    .expect("producer alive until the last item")
            } else {
                pop_spinning(&mut consumer)
            });
        }
        black_box(sum);
    });
}

fn bench_transfer(c: &mut Criterion, group_name: &str, cases: &[(&str, usize, bool)]) {
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(ITEMS_PER_ITER));
    if group_name.ends_with("sleeping") {
        // Every few items costs a park/unpark round trip (tens of microseconds), so
        // the default 100 samples would take close to a minute.
        group.sample_size(10);
    }
    for &(name, capacity, blocking) in cases {
        group.bench_with_input(
            BenchmarkId::new(name, capacity),
            &capacity,
            |b, &capacity| {
                b.iter_custom(|iters| {
                    let start = std::time::Instant::now();
                    transfer(capacity, iters * ITEMS_PER_ITER, blocking);
                    start.elapsed()
                });
            },
        );
    }
    group.finish();
}

fn cross_thread(c: &mut Criterion) {
    bench_transfer(
        c,
        "spsc_u64_cross_thread",
        &[
            ("spin", QUEUE_CAPACITY, false),
            ("wait", QUEUE_CAPACITY, true),
        ],
    );
    bench_transfer(
        c,
        "spsc_u64_cross_thread_sleeping",
        &[("wait", SMALL_CAPACITY, true)],
    );
}

criterion_group!(benches, cross_thread);
criterion_main!(benches);
