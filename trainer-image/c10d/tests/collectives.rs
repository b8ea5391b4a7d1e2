//! The binding against real c10d: Gloo process groups of 2 and 4 ranks, one per thread, meeting
//! through a TCPStore on loopback.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use finetune_c10d::{Backend, GlooDevice, ProcessGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback() -> Backend {
    Backend::Gloo(GlooDevice::Hostname("127.0.0.1".into()))
}

fn rendezvous(port: u16, rank: usize, world: usize, timeout: Duration) -> Rendezvous {
    Rendezvous {
        host: "127.0.0.1".into(),
        port,
        rank,
        world,
        timeout,
    }
}

/// Runs `body(group)` on `world` threads, one rank each; returns what each rank returned.
fn on_ranks<T: Send + 'static>(
    world: usize,
    body: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let body = body.clone();
            thread::spawn(move || {
                let rv = rendezvous(port, rank, world, Duration::from_secs(30));
                body(ProcessGroup::new(&rv, &loopback()).expect("rendezvous"))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn this_build_has_gloo() {
    assert!(
        finetune_c10d::gloo_built_in(),
        "built without gloo headers: run scripts/setup-venv.sh (it unpacks libgloo-dev)"
    );
}

#[test]
fn nccl_is_built_wherever_libtorch_has_cuda() {
    // The GPU path compiles in CI (the wheel is the CUDA one); it runs in `make gpu-check`.
    let cuda = env!("FINETUNE_C10D_LIBTORCH_CUDA") == "1";
    assert_eq!(
        finetune_c10d::nccl_built_in(),
        cuda,
        "libtorch has CUDA: {cuda}; NCCL needs nccl.h and the CUDA headers from the nvidia wheels \
         (scripts/python-requirements-c10d.txt)"
    );
}

#[test]
fn all_reduce_sums_every_tensor_over_two_and_four_ranks() {
    for world in [2usize, 4] {
        let results = on_ranks(world, |pg| {
            let r = pg.rank() as f64;
            let mut ts = vec![
                Tensor::arange(5, (Kind::Float, Device::Cpu)) * (r + 1.0),
                Tensor::full([3, 7], r, (Kind::Double, Device::Cpu)),
                Tensor::ones([1], (Kind::Float, Device::Cpu)),
            ];
            pg.all_reduce_sum(&mut ts).unwrap();
            ts
        });
        let w = world as f64;
        let ranks_plus_one: f64 = (1..=world).map(|r| r as f64).sum();
        for ts in results {
            let want0 = Tensor::arange(5, (Kind::Float, Device::Cpu)) * ranks_plus_one;
            assert!(
                ts[0].allclose(&want0, 0.0, 0.0, false),
                "world {world}: {:?}",
                ts[0]
            );
            let want1 = (0..world).map(|r| r as f64).sum::<f64>();
            assert_eq!(ts[1].size(), vec![3, 7]);
            assert_eq!(ts[1].min().double_value(&[]), want1);
            assert_eq!(ts[1].max().double_value(&[]), want1);
            assert_eq!(ts[2].double_value(&[0]), w);
        }
    }
}

#[test]
fn broadcast_copies_the_roots_tensors_to_every_rank() {
    for root in [0usize, 2] {
        let results = on_ranks(3, move |pg| {
            let mut ts = vec![Tensor::full(
                [4],
                pg.rank() as f64,
                (Kind::Float, Device::Cpu),
            )];
            pg.broadcast(&mut ts, root).unwrap();
            pg.barrier().unwrap();
            Vec::<f32>::try_from(&ts[0]).unwrap()
        });
        for v in results {
            assert_eq!(v, vec![root as f32; 4]);
        }
    }
}

#[test]
fn bad_arguments_are_refused_with_what_is_wrong() {
    let rv = rendezvous(free_port(), 2, 2, Duration::from_secs(1));
    let e = ProcessGroup::new(&rv, &loopback()).err().unwrap();
    assert!(
        e.to_string().contains("rank 2 is not in a world of 2"),
        "{e}"
    );

    let mut rv = rendezvous(free_port(), 0, 1, Duration::from_secs(10));
    rv.host = "127.0.0.1\0x".into();
    let e = ProcessGroup::new(&rv, &loopback()).err().unwrap();
    assert!(e.to_string().contains("NUL"), "{e}");

    let pg = ProcessGroup::new(
        &rendezvous(free_port(), 0, 1, Duration::from_secs(10)),
        &loopback(),
    )
    .unwrap();
    let strided = Tensor::ones([4, 4], (Kind::Float, Device::Cpu)).transpose(0, 1);
    let mut ts = vec![Tensor::ones([2], (Kind::Float, Device::Cpu)), strided];
    let e = pg.all_reduce_sum(&mut ts).unwrap_err();
    assert_eq!(e.op, "all_reduce");
    assert!(e.message.contains("tensor 1 is not contiguous"), "{e}");
    let e = pg.broadcast(&mut ts[..1], 1).unwrap_err();
    assert!(e.message.contains("root 1 is not in a world of 1"), "{e}");
    if !finetune_c10d::nccl_built_in() {
        let e = ProcessGroup::new(
            &rendezvous(free_port(), 0, 1, Duration::from_secs(10)),
            &Backend::Nccl,
        )
        .err()
        .unwrap();
        assert!(e.message.contains("without NCCL"), "{e}");
    }
}

#[test]
fn a_rank_that_never_comes_ends_the_rendezvous_with_an_error() {
    // World of 2, only rank 0 arrives: the store's timeout, not a hang.
    let rv = rendezvous(free_port(), 0, 2, Duration::from_secs(2));
    let started = std::time::Instant::now();
    let e = ProcessGroup::new(&rv, &loopback()).err().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(!e.message.is_empty(), "{e}");
}

#[test]
fn a_peer_that_leaves_fails_the_collective_instead_of_hanging() {
    let port = free_port();
    let leaver = thread::spawn(move || {
        let rv = rendezvous(port, 1, 2, Duration::from_secs(5));
        let pg = ProcessGroup::new(&rv, &loopback()).unwrap();
        drop(pg); // gone before the first collective
    });
    let rv = rendezvous(port, 0, 2, Duration::from_secs(5));
    let pg = ProcessGroup::new(&rv, &loopback()).unwrap();
    leaver.join().unwrap();
    let started = std::time::Instant::now();
    let mut ts = vec![Tensor::ones([8], (Kind::Float, Device::Cpu))];
    let e = pg.all_reduce_sum(&mut ts).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(e.op, "all_reduce");
}
