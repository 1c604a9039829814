//! Link settings for the release binary on x86_64 Linux (the Docker image's
//! and Railway's target), which rustc links with its own LLD.
//!
//! - `--symbol-ordering-file=release/symbol-order.txt`: the functions an
//!   idle service runs (startup, the warm pool, health checks), then those a
//!   request runs, laid out together at the front of the code. The kernel
//!   maps an executable's code 64 KiB at a time around each page it first
//!   touches; scattered over 23 MB of code, an idle service's 1.4 MB of
//!   functions kept 6.6 MiB of it resident (11 MiB with the warm pool).
//!   `release/symbol-order.sh` regenerates the list; a name it lists that
//!   no longer exists is skipped, so a stale list costs memory, never
//!   correctness.
//! - `-z pack-relative-relocs`: the dynamic loader's relocation table in
//!   RELR form, 13 KB instead of 843 KB read at every start. The binary then
//!   needs glibc 2.36 or newer (Debian bookworm has 2.36).
//!
//! Other targets and profiles, a linker of one's own (GNU ld and gold know
//! neither option), or `WA_PAIR_PLAIN_LINK=1` link as rustc does by
//! default.

use std::path::Path;

/// The list of functions, relative to the package.
const ORDER_FILE: &str = "release/symbol-order.txt";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=WA_PAIR_PLAIN_LINK");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let release = var("PROFILE") == "release";
    let target = var("TARGET") == "x86_64-unknown-linux-gnu";
    // A configured linker (`target.<triple>.linker`) arrives as RUSTC_LINKER;
    // a linker chosen by flags, in the encoded RUSTFLAGS.
    let rustflags = var("CARGO_ENCODED_RUSTFLAGS");
    let own_linker = std::env::var_os("RUSTC_LINKER").is_some()
        || ["fuse-ld", "linker-features", "linker="]
            .iter()
            .any(|flag| rustflags.contains(flag));
    let opted_out = var("WA_PAIR_PLAIN_LINK") == "1";
    if !release || !target || own_linker || opted_out {
        return;
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join(ORDER_FILE);
    println!("cargo::rerun-if-changed={ORDER_FILE}");
    if order.is_file() {
        // -Xlinker pairs rather than -Wl,…: a comma in the path would split it.
        link_arg("-Xlinker");
        link_arg(&format!("--symbol-ordering-file={}", order.display()));
        link_arg("-Xlinker");
        link_arg("--no-warn-symbol-ordering");
    } else {
        println!("cargo::warning={ORDER_FILE} is missing: the functions keep rustc's layout");
    }
    for arg in ["-z", "pack-relative-relocs"] {
        link_arg("-Xlinker");
        link_arg(arg);
    }
}

fn link_arg(arg: &str) {
    println!("cargo::rustc-link-arg-bins={arg}");
}
