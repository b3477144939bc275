//! Generates the agent API's message and ttrpc service code from `proto/agent.proto`.
//!
//! ttrpc-codegen writes files that start with inner attributes (`#![allow(...)]`, `//!`),
//! which `include!` cannot take. We generate into OUT_DIR, strip those lines, and the crate
//! wraps each file in a module that carries the equivalent `#[allow]`s itself.

use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let gen_dir = out.join("agent");
    fs::create_dir_all(&gen_dir).expect("create OUT_DIR/agent");
    println!("cargo:rerun-if-changed=proto/agent.proto");

    ttrpc_codegen::Codegen::new()
        .out_dir(&gen_dir)
        .include("proto")
        .input("proto/agent.proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize {
            async_all: true,
            ..Default::default()
        })
        .run()
        .expect("ttrpc code generation for proto/agent.proto failed");

    for name in ["agent.rs", "agent_ttrpc.rs"] {
        strip_inner_attributes(&gen_dir.join(name));
    }
}

/// Removes inner attributes and inner doc comments so the file can be `include!`d.
fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read generated {}: {e}", path.display()));
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !(t.starts_with("#![") || t.starts_with("//!"))
        })
        .collect();
    fs::write(path, kept.join("\n") + "\n")
        .unwrap_or_else(|e| panic!("write generated {}: {e}", path.display()));
}
