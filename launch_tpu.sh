#!/usr/bin/env bash
# Train EarthGPT on a Cloud TPU pod: one slice or several (multislice), through queued resources.
#
#   ./launch_tpu.sh --name=egpt --zone=us-east5-a --accelerator=v5p-128 [--slices=2] \
#       [--project=P] [--runtime=VERSION] [--spot] [--keep] [--dry-run] \
#       -- --config=configs/mmrs.py:size=13b,stage=b --workdir=gs://bucket/run [--config.x=y ...]
#
# The arguments after `--` go to main.py and must hold --config=... and --workdir=... (in the
# `=` form); the launcher appends --config.distributed.auto=true after them. --runtime defaults
# to the TPU VM image of the accelerator's family: v5p-* v2-alpha-tpuv5, v5litepod-*/v5e-*
# v2-alpha-tpuv5-lite, v6e-* v2-alpha-tpuv6e, v4-* tpu-ubuntu2204-base.
#
# What it does, in order: create the queued resource, wait until it is ACTIVE, copy this
# checkout (the files git tracks at HEAD: commit first) to every worker of every slice, install
# uv (if missing), a uv-managed Python 3.11 and the pinned requirements (+ jax[tpu]) on every
# worker, run main.py on all workers at once (logs stream here), and delete the queued resource
# on exit or error unless --keep. --dry-run prints every gcloud command instead of running it.
# EARTHGPT_POLL_SECONDS sets how often the queued resource's state is read (default 30).
set -euo pipefail

NAME=""
ZONE=""
ACCELERATOR=""
SLICES=1
PROJECT=""
RUNTIME=""
SPOT=0
KEEP=0
DRY_RUN=0
POLL_SECONDS="${EARTHGPT_POLL_SECONDS:-30}"
REMOTE_DIR="earthgpt-jax"
JAX_TPU_PIN="jax[tpu]==0.10.2"
# The TPU VM images ship Python 3.10; the pins need 3.11, which uv downloads (a managed CPython).
UV_PIN="uv==0.13.9"

usage() {
  # The header comment above, up to the first line that is not a comment.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
  exit "${1:-0}"
}

MAIN_ARGS=()
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCELERATOR="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --runtime=*) RUNTIME="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --keep) KEEP=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage 0 ;;
    --) shift; MAIN_ARGS=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

missing=()
[[ -n "$NAME" ]] || missing+=(--name)
[[ -n "$ZONE" ]] || missing+=(--zone)
[[ -n "$ACCELERATOR" ]] || missing+=(--accelerator)
if ((${#missing[@]})); then
  echo "error: missing ${missing[*]} (see --help)" >&2
  exit 2
fi
if ! [[ "$SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --slices must be a positive integer, got '$SLICES'" >&2
  exit 2
fi
if ((${#MAIN_ARGS[@]} == 0)); then
  echo "error: give main.py's arguments after --, e.g. -- --config=configs/mmrs.py --workdir=gs://b/run" >&2
  exit 2
fi
# Checked here, before anything is created: main.py would only fail once the pod is up.
for flag in --config --workdir; do
  found=0
  for arg in "${MAIN_ARGS[@]}"; do
    [[ "$arg" == "$flag="?* ]] && found=1
  done
  if ((!found)); then
    echo "error: main.py's arguments after -- need $flag=... (in the = form), e.g." \
      "-- --config=configs/mmrs.py:size=13b,stage=b --workdir=gs://bucket/run" >&2
    exit 2
  fi
done

if [[ -z "$RUNTIME" ]]; then
  case "$ACCELERATOR" in
    v5p-*) RUNTIME="v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) RUNTIME="v2-alpha-tpuv5-lite" ;;
    v6e-*) RUNTIME="v2-alpha-tpuv6e" ;;
    v4-*) RUNTIME="tpu-ubuntu2204-base" ;;
    *)
      echo "error: no default runtime for --accelerator=$ACCELERATOR; the known families are" \
        "v4-*, v5p-*, v5litepod-* (v5e-*) and v6e-*; name the TPU VM image with --runtime=..." >&2
      exit 2
      ;;
  esac
fi

GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")

# Runs a gcloud command, or prints it (shell-quoted) under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Node names: one slice is NAME; several are NAME-0 .. NAME-(N-1) (--node-prefix).
NODES=()
if ((SLICES == 1)); then
  NODES=("$NAME")
else
  for ((i = 0; i < SLICES; i++)); do NODES+=("$NAME-$i"); done
fi

ARCHIVE=""
# shellcheck disable=SC2317  # invoked through the EXIT trap
cleanup() {
  local status=$?
  [[ -n "$ARCHIVE" ]] && rm -f "$ARCHIVE"
  if ((KEEP)); then
    echo "keeping queued resource $NAME (--keep); delete it with:" >&2
    echo "  gcloud compute tpus queued-resources delete $NAME ${GCLOUD_COMMON[*]} --force --async" >&2
  else
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_COMMON[@]}" --force \
      --quiet --async || true
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

create=(gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_COMMON[@]}"
  --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME")
if ((SLICES == 1)); then
  create+=(--node-id="$NAME")
else
  create+=(--node-count="$SLICES" --node-prefix="$NAME")
fi
((SPOT)) && create+=(--spot)
run "${create[@]}"

if ((DRY_RUN)); then
  run gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_COMMON[@]}" \
    --format='value(state.state)'
else
  echo "waiting for $NAME to become ACTIVE (polling every ${POLL_SECONDS}s)" >&2
  while true; do
    state=$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_COMMON[@]}" \
      --format='value(state.state)')
    echo "  $(date +%H:%M:%S) $state" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) echo "error: queued resource $NAME is $state" >&2; exit 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
fi

# The code: the files git tracks, so local work directories and venvs stay here.
ARCHIVE=$(mktemp -t earthgpt-XXXXXX.tar.gz)
run git -C "$(dirname "$0")" archive --format=tar.gz -o "$ARCHIVE" HEAD

# uv lands in ~/.local/bin, which a non-interactive ssh shell does not have on its PATH. A uv
# already there is used as it is.
setup="export PATH=\"\$HOME/.local/bin:\$PATH\" \
&& { command -v uv >/dev/null || python3 -m pip install -q --user '$UV_PIN'; } \
&& rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf earthgpt.tar.gz -C $REMOTE_DIR \
&& cd $REMOTE_DIR && uv venv -q --python 3.11 .venv \
&& uv pip install -q --python .venv/bin/python -r requirements.txt '$JAX_TPU_PIN'"
# distributed.auto: every worker joins the run through jax.distributed.initialize(). It goes
# after the user's arguments: absl refuses a --config.* override before --config=.
quoted_args=$(printf ' %q' "${MAIN_ARGS[@]}")
train="cd $REMOTE_DIR && .venv/bin/python main.py$quoted_args --config.distributed.auto=true"

for node in "${NODES[@]}"; do
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$node:earthgpt.tar.gz" "${GCLOUD_COMMON[@]}" \
    --worker=all
  run gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_COMMON[@]}" --worker=all \
    --command="$setup"
done

# All workers of all slices start together; each streams its output here.
pids=()
for node in "${NODES[@]}"; do
  launch=(gcloud compute tpus tpu-vm ssh "$node" "${GCLOUD_COMMON[@]}" --worker=all
    --command="$train")
  if ((DRY_RUN)); then
    run "${launch[@]}"
  else
    "${launch[@]}" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]+"${pids[@]}"}"; do
  wait "$pid" || status=$?
done
exit "$status"
