//! The `kvs-emulator` program (crate `kvs-emulator`, folder `emulator/`), also built as an
//! example of this crate so that `cargo run --example kvs_emulator -- …` keeps working. Same
//! flags; see `emulator/src/main.rs` and `emulator/README.md`.

#[path = "../emulator/src/main.rs"]
mod program;

fn main() -> anyhow::Result<()> {
    program::main()
}
