//! Micro-batches: how many of a batch's sequences go through one forward pass.
//!
//! `hyperparameters.batchSize` is what the batcher groups and what one update sees; a batch is
//! split into micro-batches of `microBatchSize` rows whose gradients accumulate before the update,
//! with the loss normalised by the supervised tokens of the whole step, so the split changes the
//! memory a forward pass needs and not the update. When a forward or backward pass runs out of
//! memory (libtorch's allocator fails: "CUDA out of memory", or on CPU "can't allocate memory"
//! under an address-space limit), the trainer does not exit: the step's partial gradients are
//! dropped, the micro-batch is halved, and the same step runs again from the same rows. Only a
//! micro-batch of one sequence that does not fit ends the run (exit 4).

use crate::error::contain_panic;
use crate::train::stop::{Stop, is_oom};

/// Splits each batch (rows of sample indices) into micro-batches of at most `size` rows, in order.
pub fn split(batches: &[Vec<Vec<usize>>], size: usize) -> Vec<Vec<Vec<usize>>> {
    batches
        .iter()
        .flat_map(|rows| rows.chunks(size.max(1)).map(<[Vec<usize>]>::to_vec))
        .collect()
}

/// The next micro-batch size after running out of memory at `size` (> 1).
pub fn halved(size: usize) -> usize {
    size.div_ceil(2)
}

/// Runs `attempt(size)` and, while it runs out of memory, calls `reduced(from, to, message)` and
/// tries again with half the micro-batch. Returns what `attempt` returned and the size that fit;
/// `Stop::Oom` when a micro-batch of one does not fit. Any other panic goes on unwinding.
pub fn fit<T>(
    mut size: usize,
    mut attempt: impl FnMut(usize) -> T,
    mut reduced: impl FnMut(usize, usize, &str),
) -> Result<(T, usize), Stop> {
    loop {
        match contain_panic(|| attempt(size)) {
            Ok(value) => return Ok((value, size)),
            Err(message) if !is_oom(&message) => std::panic::resume_unwind(Box::new(message)),
            Err(message) if size <= 1 => {
                return Err(Stop::Oom(format!(
                    "out of memory with a micro-batch of one sequence: {}; turn on \
                     hyperparameters.gradientCheckpointing, lower maxSeqLength, or give the \
                     trainer more memory",
                    first_line(&message)
                )));
            }
            Err(message) => {
                let to = halved(size);
                reduced(size, to, first_line(&message));
                size = to;
            }
        }
    }
}

/// libtorch's messages carry a C++ backtrace after the first line (as `\n` escapes when the
/// message is a debug-formatted `TchError`).
fn first_line(message: &str) -> &str {
    let m = message.trim_start_matches("called `Result::unwrap()` on an `Err` value: Torch(\"");
    let end = [m.find('\n'), m.find("\\n")].into_iter().flatten().min();
    end.map_or(m, |i| &m[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_keeps_every_row_in_order_and_never_crosses_batches() {
        let batches = vec![vec![vec![0], vec![1, 2], vec![3]], vec![vec![4], vec![5]]];
        let micro = split(&batches, 2);
        assert_eq!(
            micro,
            vec![
                vec![vec![0], vec![1, 2]],
                vec![vec![3]],
                vec![vec![4], vec![5]]
            ]
        );
        assert_eq!(split(&batches, 8).len(), 2);
        assert_eq!(split(&batches, 1).len(), 5);
    }

    #[test]
    fn halving_reaches_one_from_any_size() {
        for start in 2..40 {
            let mut s = start;
            let mut steps = 0;
            while s > 1 {
                let next = halved(s);
                assert!(next < s && next >= s / 2, "{s} -> {next}");
                s = next;
                steps += 1;
            }
            assert!(steps <= 7, "{start}: {steps}");
        }
    }

    #[test]
    fn an_out_of_memory_panic_halves_until_the_attempt_fits() {
        let mut seen = Vec::new();
        let mut log = Vec::new();
        let (value, size) = fit(
            8,
            |size| {
                seen.push(size);
                if size > 2 {
                    panic!(
                        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
                    );
                }
                size * 10
            },
            |from, to, m| log.push((from, to, m.to_string())),
        )
        .unwrap();
        assert_eq!((value, size), (20, 2));
        assert_eq!(seen, vec![8, 4, 2]);
        assert_eq!(log.len(), 2);
        assert!(log[0].2.contains("can't allocate memory"), "{log:?}");
        let torch = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory.\\nframe #0: c10";
        assert_eq!(first_line(torch), "CUDA out of memory.");
    }

    #[test]
    fn one_sequence_that_does_not_fit_stops_with_the_advice() {
        let r = fit::<()>(
            2,
            |_| panic!("CUDA out of memory. Tried to allocate 2.00 GiB"),
            |_, _, _| {},
        );
        match r {
            Err(Stop::Oom(m)) => {
                assert!(m.contains("gradientCheckpointing") && m.contains("CUDA out of memory"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_panics_are_not_taken_for_memory() {
        let r = std::panic::catch_unwind(|| {
            fit::<()>(4, |_| panic!("index out of range"), |_, _, _| {})
        });
        let payload = r.unwrap_err();
        assert_eq!(
            payload.downcast_ref::<String>().unwrap(),
            "index out of range"
        );
    }
}
