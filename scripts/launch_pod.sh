#!/usr/bin/env bash
# Runs the same retina_jax command on every host of a TPU VM pod slice.
#
#   scripts/launch_pod.sh --name my-v4-32 --zone us-central2-b --topology v4:2x2x4 \
#       [--dry-run] [--setup] [--skip-plan] \
#       -- -m retina_jax.main --config experiments/retinanet_r50_coco.py:batch=64 \
#          --workdir gs://my-bucket/r50
#
# First, here and before any gcloud command (also with --dry-run), `retina_jax.tools.pod_plan`
# compiles the command's --config (and its --config.x=y overrides) for the pod's --topology
# (v4-32: v4:2x2x4, v5e-256: v5e:16x16, v5p-128: v5p:4x4x4) and stops when the step does not
# fit (needs requirements-tpu.txt here; $PYTHON, default python3; --skip-plan skips it).
# Every host runs `python3 <args> --distributed` from the repository's directory on the VM
# (--repo_dir, default ~/retina_jax); jax.distributed.initialize() finds the peers. A fused sweep
# (`-- scripts/sweep.py EXPERIMENT --fused --workdir_root gs://... [-- --config.x=y]`, one job
# per host) gets --distributed among the flags after its own `--` (which is added if missing),
# where sweep.py takes retina_jax.main's flags, and is planned as `pod_plan --sweep EXPERIMENT`
# with the overrides. --setup first
# copies this checkout's files (those git tracks or would track: no .venv, no workdirs) to every
# host, over what an earlier --setup put there, and installs requirements.txt and
# requirements-tpu.txt (the TPU runtime). --dry-run prints the exact gcloud commands instead of
# running them.
#
# Each host's training ends with a code that says whether to run this again (README, "Exit
# codes"): 0 finished; 143 preempted after saving, and 75 a host was lost (killed, hung,
# unreachable): run the same command again, it resumes; 1 an error, on one host or all, that
# every host's log names: do not restart before fixing it, a restart would repeat it.
set -euo pipefail
name="" zone="" dry_run=0 setup=0 repo_dir='~/retina_jax' project="" topology="" plan=1
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --topology) topology="$2"; shift 2 ;;
    --skip-plan) plan=0; shift ;;
    --project) project="$2"; shift 2 ;;
    --repo_dir) repo_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --setup) setup=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (the training command goes after --)" >&2; exit 2 ;;
  esac
done
if [ -z "$name" ] || [ -z "$zone" ] || [ $# -eq 0 ] || { [ "$plan" = 1 ] && [ -z "$topology" ]; }; then
  echo "usage: $0 --name TPU_NAME --zone ZONE --topology GEN:SHAPE [--skip-plan] [--project P]" \
       "[--dry-run] [--setup] -- ARGS..." >&2
  exit 2
fi
sweep=0
case "$1" in *sweep.py) sweep=1 ;; esac
if [ "$plan" = 1 ]; then
  # The training command's config and overrides, as retina_jax.main would read them; a sweep's
  # experiment (sweep.py's first argument that is not an option or an option's value).
  plan_args=()
  args=("$@")
  for ((i = 1; sweep == 1 && i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --) break ;;
      --workdir_root|--pod|--zone) i=$((i + 1)) ;;
      -*) ;;
      *) plan_args+=(--sweep "${args[i]}"); break ;;
    esac
  done
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --config=*|--config.*=*) plan_args+=("${args[i]}") ;;
      --config|--config.*) plan_args+=("${args[i]}" "${args[i + 1]:-}"); i=$((i + 1)) ;;
    esac
  done
  if ! (cd "$(dirname "$0")/.." && "${PYTHON:-python3}" -m retina_jax.tools.pod_plan \
        --topology "$topology" "${plan_args[@]}"); then
    echo "launch_pod.sh: stopped before any gcloud command: pod_plan for $topology failed" \
         "(above). Change the command or the topology, or pass --skip-plan." >&2
    exit 1
  fi
fi
base=(gcloud compute tpus tpu-vm)
target=("$name" "--zone=$zone" "--worker=all")
[ -n "$project" ] && target+=("--project=$project")
quoted=$(printf '%q ' "$@")
# scripts/sweep.py reads the flags of its runs after its `--`; add one where it has none.
if [ "$sweep" = 1 ] && ! printf '%s\n' "$@" | grep -qx -- '--'; then quoted+="-- "; fi
run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
if [ "$setup" = 1 ]; then
  # An archive rather than `scp --recurse` of the folder: that uploads the local .venv (GBs) to
  # every host, and a second --setup lands in $repo_dir/<folder>, leaving the old code to run.
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive="${TMPDIR:-/tmp}/retina_jax-setup-$$.tar.gz"
  qa=$(printf '%q' "$archive")
  run bash -c "cd $(printf '%q' "$repo") && if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $qa; else tar --exclude=./.venv --exclude=./workdirs --exclude=./.git -czf $qa .; fi"
  run "${base[@]}" scp "$archive" "${target[0]}:retina_jax-setup.tar.gz" "${target[@]:1}"
  run "${base[@]}" ssh "${target[@]}" --command="mkdir -p $repo_dir && tar -xzf retina_jax-setup.tar.gz -C $repo_dir && cd $repo_dir && python3 -m pip install -q -r requirements.txt -r requirements-tpu.txt && python3 -m pip install -q --no-deps -e ."
  [ "$dry_run" = 1 ] || rm -f "$archive"
fi
run "${base[@]}" ssh "${target[@]}" --command="cd $repo_dir && python3 $quoted--distributed"
