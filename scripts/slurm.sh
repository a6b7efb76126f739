#!/usr/bin/env bash
# Run the experiment grid as a Slurm array job, one shard per array task, then merge the shards.
#
#   scripts/slurm.sh [profile] [shards]        # defaults: quick, 4
#
# Submits two jobs from the checkout it is run in: an array of `shards` tasks, task K running
# `datamux run experiments/ --profile <profile> --shard K/<shards>` into reproduced/<profile>-shards/K,
# and, after every task has ended, one job that merges them into reproduced/<profile>/ and runs
# `datamux run ... --compare-with results/` there (it trains nothing; it checks the expectations
# and compares with the published tables). A rerun of a task resumes its shard. Extra sbatch
# options (partition, account, time) come from SBATCH_* variables or the site's defaults; data
# and models from DATAMUX_DATA_DIR / DATAMUX_MODELS_DIR as for `datamux run`.
# DATAMUX_GPUS_PER_TASK asks Slurm for GPUs; what a GPU build does today is in docs/cluster.md.
set -euo pipefail

profile="${1:-quick}"
shards="${2:-4}"
cd "$(dirname "$0")/.."
root="$(pwd)"
bin="${DATAMUX_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/datamux}"
if [ ! -x "$bin" ]; then
    echo "error: no datamux binary at $bin: run \`cargo build --release -p datamux-runner\` first (or set DATAMUX_BIN)" >&2
    exit 2
fi
case "$shards" in
    ''|*[!0-9]*|0) echo "error: shards must be a positive integer, got \`$shards\`" >&2; exit 2 ;;
esac
out="reproduced/${profile}-shards"
mkdir -p "$out/logs"
gpus=()
if [ -n "${DATAMUX_GPUS_PER_TASK:-}" ]; then
    gpus=(--gpus-per-task "$DATAMUX_GPUS_PER_TASK")
fi

array_id=$(sbatch --parsable --job-name "datamux-$profile" --array "1-$shards" \
    --cpus-per-task "${DATAMUX_CPUS_PER_TASK:-2}" "${gpus[@]}" \
    --output "$out/logs/shard-%a.log" --chdir "$root" \
    --wrap "\"$bin\" run experiments/ --profile \"$profile\" --shard \"\${SLURM_ARRAY_TASK_ID}/$shards\" --out \"$out/\${SLURM_ARRAY_TASK_ID}\" --no-report")

shard_dirs=""
for k in $(seq 1 "$shards"); do shard_dirs="$shard_dirs $out/$k"; done
merge_id=$(sbatch --parsable --job-name "datamux-$profile-merge" --dependency "afterany:$array_id" \
    --output "$out/logs/merge.log" --chdir "$root" \
    --wrap "\"$bin\" merge $shard_dirs --out \"reproduced/$profile\" && \"$bin\" run experiments/ --profile \"$profile\" --out \"reproduced/$profile\" --compare-with results/")

echo "submitted: shards $array_id (1-$shards), merge $merge_id; logs in $out/logs/"
