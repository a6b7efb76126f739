# datamux: every recipe is one cargo command, so CI can call cargo directly where `just` is missing.
# The datasets come from the Hugging Face hub, or from a local mirror named by DATAMUX_DATA_DIR;
# pretrained models likewise, or from a local models folder named by DATAMUX_MODELS_DIR.

set positional-arguments

default:
    @just --list

# Run the tests (CPU only, no network; builds with the release profile, shared with `reproduce`).
test:
    cargo test --workspace --release

# Formatting and lints, warnings as errors.
check:
    cargo fmt --all --check && cargo clippy --workspace --all-targets --release -- -D warnings

# Run the experiment grid at a profile (quick: ~30 min on 2 cores; standard: hours) into
# results/ (quick) or results/<profile>/ (the others): one profile per table.
reproduce profile="quick":
    cargo run --release -p datamux-runner -- run experiments/ --profile {{profile}} --out {{ if profile == "quick" { "results/" } else { "results/" + profile + "/" } }}

# Every experiment at its tiny `smoke` profile, into a temporary folder, tables checked.
smoke:
    cargo run --release -p datamux-runner -- verify experiments/

# Regenerate results/<experiment>/README.md and plots from the Parquet tables.
report:
    cargo run --release -p datamux-runner -- report results/

# Throughput of the sentence MuxNet (small and base) and the MNIST ViT for every N, into results/bench/.
bench *args:
    cargo run --release -p datamux-runner -- bench --out results/ "$@"

# API docs of the core crate (warnings are errors).
doc:
    RUSTDOCFLAGS="-D warnings" cargo doc -p datamux-core --no-deps --release
