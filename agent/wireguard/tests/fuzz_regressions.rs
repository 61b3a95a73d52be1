//! The receive path's fuzz checks on fixed inputs: one of each shape the fuzz target builds,
//! plus every input the fuzzer ever found a problem with.

use netagent_wireguard::fuzzing::{Pair, check_receive};

#[test]
fn receive_survives_what_the_fuzzer_tried() {
    let pair = Pair::new();
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![1, 1, 0, 0, 0],
        // Raw: each message type's tag with nothing after it, and oversized junk.
        vec![0, 1],
        vec![0, 2, 0, 0, 0],
        vec![0, 3, 0, 0, 0, 0, 0, 0, 0],
        vec![0, 4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
        [vec![0, 4, 0, 0, 0], vec![0x55; 2000]].concat(),
        // A valid data packet, unchanged (delivered), replayed, and with a flipped byte in its
        // header, counter and ciphertext.
        vec![2],
        vec![2],
        [vec![2, 0, 0, 0, 0, 1]].concat(),
        [vec![2], vec![0; 8], vec![1]].concat(),
        [vec![2], vec![0; 40], vec![0x80]].concat(),
        // The same from a stranger.
        vec![3],
        // A's handshake initiation, unchanged (a new handshake), truncated-ish, and mangled.
        vec![4],
        [vec![4], vec![0; 100], vec![1]].concat(),
        [vec![5], vec![0xff; 150]].concat(),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            inputs.push(std::fs::read(e.path()).expect("regression input"));
        }
    }
    for input in &inputs {
        check_receive(&pair, input);
    }
}
