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

# Run the experiment grid at a profile (quick: ~30 min on 2 cores; standard: hours) into the
# working folder reproduced/<profile>/ (ignored by git; resumable), then compare every point with
# the published tables (results/ for quick, results/<profile>/ for the others). Exit codes: README.
reproduce profile="quick":
    cargo run --release -p datamux-runner -- run experiments/ --profile {{profile}} --out reproduced/{{profile}} --compare-with results/

# Publish a finished working folder into results/: each of its points replaces the published one.
publish profile="quick":
    cargo run --release -p datamux-runner -- publish reproduced/{{profile}} --to results/

# Every experiment at its tiny `smoke` profile, into a temporary folder, tables checked.
smoke:
    cargo run --release -p datamux-runner -- verify experiments/

# Regenerate results/<experiment>/README.md and plots from the Parquet tables.
report:
    cargo run --release -p datamux-runner -- report results/

# Throughput of the sentence MuxNet (small and base) and the MNIST ViT for every N, into results/bench/.
bench *args:
    cargo run --release -p datamux-runner -- bench --out results/ "$@"

# Train (or reuse) the serve experiments' models of several N, then serve each under fixed:1,
# fixed:N_max and adaptive and load-test all three at one ladder of rates (loopback only; about
# 20 minutes on 2 cores): rows into reproduced/quick/serve/serve.parquet (docs/serving.md).
serve-bench *args:
    cargo run --release -p datamux-runner -- serve-bench --out reproduced/quick "$@"

# API docs of the core crate (warnings are errors).
doc:
    RUSTDOCFLAGS="-D warnings" cargo doc -p datamux-core --no-deps --release
