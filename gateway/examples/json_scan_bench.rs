//! Throughput of the incremental JSON usage scanner (`usage::JsonScanner`)
//! on large response bodies. A measurement, not a test: it prints figures.

use std::time::Instant;

use plangate::usage::{dotted, JsonScanner};

/// Throughput on 10 MiB bodies, fed in 64 KiB chunks. Not asserted (the
/// machine is shared); run it in release to read the figures:
///
/// `cargo run --release -p plangate --example json_scan_bench`
///
/// Measured on the shared 2-core AMD EPYC dev VM (±20% run to run):
///
/// ```text
/// base64 string: 10.5 MB, first run 14630 MB/s, best of 5 86033 MB/s (0.12 ms)
/// float embeddings: 10.5 MB, first run 1741 MB/s, best of 5 1805 MB/s (5.81 ms)
/// prompt_logprobs: 10.5 MB, first run 687 MB/s, best of 5 755 MB/s (13.88 ms)
/// ```
///
/// (An earlier run gave 1018 MB/s for `prompt_logprobs`; the best-of-5
/// base64 figure is the 10 MiB body sitting in the 32 MiB L3.)
fn main() {
    const SIZE: usize = 10 << 20;
    let bodies = [
        (
            "base64 string",
            format!(
                r#"{{"data":[{{"embedding":{}}}],"usage":{{"total_tokens":9}}}}"#,
                base64_string(SIZE)
            ),
        ),
        (
            "float embeddings",
            format!(
                r#"{{"data":[{{"embedding":{}}}],"usage":{{"total_tokens":9}}}}"#,
                float_array(SIZE)
            ),
        ),
        (
            "prompt_logprobs",
            format!(
                r#"{{"usage":{{"total_tokens":9}},"prompt_logprobs":{}}}"#,
                prompt_logprobs(SIZE)
            ),
        ),
    ];
    for (name, body) in &bodies {
        let runs: Vec<f64> = (0..5)
            .map(|_| {
                let start = Instant::now();
                let mut s = JsonScanner::new(vec![dotted("usage.total_tokens")]);
                for c in body.as_bytes().chunks(64 << 10) {
                    s.feed(c);
                }
                let secs = start.elapsed().as_secs_f64();
                assert_eq!(s.value(0), Some(9));
                secs
            })
            .collect();
        let best = runs.iter().copied().fold(f64::MAX, f64::min);
        let first = runs.first().copied().unwrap_or(best);
        let mb = body.len() as f64 / 1e6;
        println!(
            "{name}: {mb:.1} MB, first run {:.0} MB/s, best of 5 {:.0} MB/s ({:.2} ms)",
            mb / first,
            mb / best,
            best * 1e3
        );
    }
}

/// A vLLM-style `prompt_logprobs` array of at least `bytes` bytes.
fn prompt_logprobs(bytes: usize) -> String {
    let mut s = String::from("[null");
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            r#",{{"{}":{{"logprob":-{}.{:04},"rank":{},"decoded_token":"tok\"{}\\n"}}}}"#,
            1000 + i % 30_000,
            i % 7,
            i % 9973,
            1 + i % 50,
            i % 100
        ));
        i += 1;
    }
    s.push(']');
    s
}

/// An OpenAI `encoding_format: float` embedding of at least `bytes` bytes.
fn float_array(bytes: usize) -> String {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            "-0.0{:08},",
            i.wrapping_mul(2_654_435_761) % 100_000_000
        ));
        i += 1;
    }
    s.push_str("0.5]");
    s
}

/// A base64-looking string of `bytes` bytes, quoted.
fn base64_string(bytes: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes + 2);
    s.push('"');
    s.extend((0..bytes).map(|i| char::from(alphabet[(i * 7 + i / 64) % 64])));
    s.push('"');
    s
}
