#!/usr/bin/env bash
# Runs one rrcm-jax command on every worker of a Cloud TPU VM slice.
#
# Usage:
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type TYPE [options] -- COMMAND...
#
# Example (ImageNet RCM-B pre-training on 32 v5p chips, spot capacity):
#   launch/tpu_pod.sh --name rrcm-b --zone us-east5-a --accelerator-type v5p-64 --spot -- \
#     python -m rrcm_jax.pretrain --config=configs/imagenet_pretrain_rcmb.py \
#       --workdir=gs://my-bucket/rrcm/pretrain-imagenet-rcmb
#
# Steps, each a gcloud command (--dry-run prints them, one per line):
#   1. create the slice (`tpu-vm create`, or with --queued `queued-resources create`
#      and wait until it is ACTIVE); an existing READY/ACTIVE slice of that name is
#      reused, a preempted one is deleted and created again; --reuse skips this step;
#   2. ship the code: the working tree (files git tracks or does not ignore) is packed
#      into one archive and copied to every worker (`tpu-vm scp --worker=all`), or with
#      --repo URL every worker clones it;
#   3. install on every worker: `pip install -c requirements/constraints.txt "jax[tpu]"` and
#      `pip install -c requirements/constraints.txt -e ".[data]"` (the tested versions);
#   4. run COMMAND on every worker at once (`tpu-vm ssh --worker=all`) from the code
#      directory with RRCM_DISTRIBUTED=1, so that jax.distributed.initialize() finds the
#      slice's other workers on its own. Each worker's output goes to
#      ~/rrcm-logs/worker-HOSTNAME.log on the worker and, through gcloud's
#      --output-directory, to one file per worker in the local --log-dir.
#
# Preemption: a spot/preemptible slice can vanish at any step. Re-running the same
# command recreates it and the trainers resume from the newest checkpoint in their
# --workdir, which must therefore be a gs:// path (Orbax and TF's file system read and
# write it; every worker sees the same one). --max-restarts N does that re-run itself.
#
# Exit statuses of COMMAND (as gcloud's ssh passes them on): 75 means preempted with a
# checkpoint written; the slice is checked (recreated if gone) and COMMAND runs again,
# resuming, up to --max-resumes times (default 10). 2 (bad input), 65 (no intact
# checkpoint) and 69 (workdir in use) stop at once: rerunning cannot help. Other failures
# (e.g. 255: the ssh connection died with the slice) are retried --max-restarts times.
#
# A dry run makes no query: it prints the commands for a slice that does not exist
# yet (or, with --reuse, for an existing one). Lines starting with '#' are notes.
set -euo pipefail

readonly PROG="tpu_pod.sh"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
readonly REMOTE_DIR="rrcm-jax"            # code directory in each worker's home
readonly REMOTE_ARCHIVE="rrcm-jax.tar.gz"  # copied archive in each worker's home
POLL_SECONDS="${RRCM_POLL_SECONDS:-60}"

usage() {
  header_help
  cat <<'EOF'
Options:
  --name NAME               TPU VM (and queued-resource) name: lowercase letters, digits, '-'.
  --zone ZONE               Cloud zone, e.g. us-east5-a.
  --accelerator-type TYPE   slice type, e.g. v5p-64, v6e-32, v4-32 (not needed with --reuse).
  --version VERSION         TPU software version; default by type: v6e v2-alpha-tpuv6e,
                            v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base.
  --project PROJECT         Cloud project (default: gcloud's configured project).
  --spot | --preemptible    cheaper capacity that can be reclaimed (--queued takes --spot only).
  --queued                  request the slice as a queued resource and wait until ACTIVE.
  --reuse                   the slice exists and is ready: skip creation.
  --repo URL | --copy       clone URL on every worker, or copy the local tree (default).
  --env KEY=VALUE           export KEY=VALUE on every worker (repeatable).
  --log-dir DIR             local directory of per-worker logs (default logs/NAME).
  --max-restarts N          recreate the slice and rerun up to N times after a failure (default 0).
  --max-resumes N           rerun up to N times when COMMAND exits 75, preempted (default 10).
  --dry-run                 print the gcloud commands instead of running them.
  -h, --help                this text.
EOF
}

# Runs a command, or prints it (one line, shell-quoted) in a dry run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    quote_words "$@"
    printf '\n'
  else
    "$@"
  fi
}

note() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '%s: %s\n' "$PROG" "$*" >&2
  fi
}

default_version() {
  case $1 in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

parse_args() {
  NAME="" ZONE="" TYPE="" VERSION="" PROJECT="" CAPACITY="" QUEUED=0 REUSE=0
  REPO="" COPY=0 DRY_RUN=0 LOG_DIR="" MAX_RESTARTS=0 MAX_RESUMES=10
  ENV_VARS=() USER_CMD=()
  while (($# > 0)); do
    case $1 in
      --name | --zone | --accelerator-type | --version | --project | --repo | --env | --log-dir | --max-restarts | --max-resumes)
        if (($# < 2)) || [[ -z $2 || $2 == --* ]]; then die "$1 needs a value."; fi
        case $1 in
          --name) NAME=$2 ;;
          --zone) ZONE=$2 ;;
          --accelerator-type) TYPE=$2 ;;
          --version) VERSION=$2 ;;
          --project) PROJECT=$2 ;;
          --repo) REPO=$2 ;;
          --env) ENV_VARS+=("$2") ;;
          --log-dir) LOG_DIR=$2 ;;
          --max-restarts) MAX_RESTARTS=$2 ;;
          --max-resumes) MAX_RESUMES=$2 ;;
        esac
        shift 2
        ;;
      --spot | --preemptible)
        [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "--spot and --preemptible exclude each other; give one."
        CAPACITY=$1
        shift
        ;;
      --queued) QUEUED=1; shift ;;
      --reuse) REUSE=1; shift ;;
      --copy) COPY=1; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; USER_CMD=("$@"); break ;;
      *) die "unknown argument '$1' (options come before '--', the command after it; see --help)." ;;
    esac
  done
}

validate_args() {
  [[ -n $NAME ]] || die "--name is required (the TPU VM name)."
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
    || die "--name '$NAME' is not a valid TPU name (lowercase letters, digits and '-', starting with a letter)."
  [[ -n $ZONE ]] || die "--zone is required (e.g. --zone us-east5-a)."
  if [[ $REUSE == 0 ]]; then
    [[ -n $TYPE ]] || die "--accelerator-type is required to create a slice (e.g. v5p-64), or pass --reuse."
  fi
  [[ -z $TYPE || $TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] \
    || die "--accelerator-type '$TYPE' is not a TPU type like v5p-64, v6e-32 or v4-32."
  [[ $QUEUED == 0 || $CAPACITY != --preemptible ]] \
    || die "--preemptible cannot be queued; use --spot with --queued."
  [[ -z $REPO || $COPY == 0 ]] || die "--repo and --copy exclude each other; give one."
  [[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "--max-restarts must be a whole number (got '$MAX_RESTARTS')."
  [[ $MAX_RESUMES =~ ^[0-9]+$ ]] || die "--max-resumes must be a whole number (got '$MAX_RESUMES')."
  local kv
  for kv in "${ENV_VARS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE."
  done
  ((${#USER_CMD[@]} > 0)) || die "no command given; put it after '--', e.g. -- python -m rrcm_jax.pretrain --config=... --workdir=gs://..."
  VERSION=${VERSION:-$(default_version "$TYPE")}
  LOG_DIR=${LOG_DIR:-logs/$NAME}
  WHERE=(--zone="$ZONE")
  [[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
}

node_state() {
  gcloud compute tpus tpu-vm describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || true
}

queued_state() {
  gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}" --format='value(state.state)' 2>/dev/null || true
}

create_node() {
  local flags=(--accelerator-type="$TYPE" --version="$VERSION")
  [[ -z $CAPACITY ]] || flags+=("$CAPACITY")
  run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" "${flags[@]}"
}

create_queued() {
  local flags=(--node-id="$NAME" --accelerator-type="$TYPE" --runtime-version="$VERSION")
  [[ -z $CAPACITY ]] || flags+=("$CAPACITY")
  run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" "${flags[@]}"
}

# Brings the slice to READY (or its queued resource to ACTIVE): creates it when absent,
# deletes and recreates it when preempted, waits while it is on its way.
ensure_slice() {
  if [[ $REUSE == 1 ]]; then
    note "reusing TPU VM $NAME as it is (--reuse)"
    return
  fi
  if [[ $DRY_RUN == 1 ]]; then
    if [[ $QUEUED == 1 ]]; then
      create_queued
      note "wait until queued resource $NAME is ACTIVE (polls every ${POLL_SECONDS}s)"
    else
      create_node
    fi
    return
  fi
  local state created=0
  while :; do
    if [[ $QUEUED == 1 ]]; then state=$(queued_state); else state=$(node_state); fi
    case $state in
      "")
        if [[ $created == 1 ]]; then sleep "$POLL_SECONDS"; continue; fi
        if [[ $QUEUED == 1 ]]; then create_queued; else create_node; fi
        created=1
        ;;
      READY | ACTIVE) note "TPU $NAME is $state"; return ;;
      PREEMPTED | TERMINATED)
        note "TPU VM $NAME is $state; deleting it to create it again"
        run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
        ;;
      SUSPENDED | FAILED)
        note "queued resource $NAME is $state; deleting it to queue it again"
        run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
        ;;
      STOPPED) run gcloud compute tpus tpu-vm start "$NAME" "${WHERE[@]}" ;;
      *) note "TPU $NAME is $state; checking again in ${POLL_SECONDS}s"; sleep "$POLL_SECONDS" ;;
    esac
  done
}

# Packs the working tree (what git tracks or does not ignore; without git, all but
# .git, .venv, workdirs and logs) into one archive.
pack_tree() {
  local root archive=$1
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  note "pack $root (files git tracks or does not ignore) into $archive"
  [[ $DRY_RUN == 1 ]] && return
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # The archive has no .git: CODE_VERSION tells runs.jsonl which commit runs on the workers.
    local file stamp version
    stamp=$(mktemp -d)
    version=$(git -C "$root" rev-parse HEAD)
    [[ -z $(git -C "$root" status --porcelain --untracked-files=no) ]] || version+="+dirty"
    printf '%s\n' "$version" >"$stamp/CODE_VERSION"
    while IFS= read -r -d '' file; do
      [[ ! -e $root/$file ]] || printf '%s\0' "$file"   # tracked files deleted here stay out
    done < <(git -C "$root" ls-files -z --cached --others --exclude-standard) \
      | tar -czf "$archive" -C "$root" --null -T - -C "$stamp" CODE_VERSION
    rm -rf "$stamp"
  else
    tar -C "$root" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=logs -czf "$archive" .
  fi
}

ship_and_install() {
  local fetch install
  if [[ -n $REPO ]]; then
    fetch="if [ -d ~/$REMOTE_DIR/.git ]; then git -C ~/$REMOTE_DIR pull --ff-only; else rm -rf ~/$REMOTE_DIR; git clone $(quote_word "$REPO") ~/$REMOTE_DIR; fi"
  else
    local archive="${TMPDIR:-/tmp}/rrcm-jax-$NAME.tar.gz"
    pack_tree "$archive"
    run gcloud compute tpus tpu-vm scp "$archive" "$NAME:$REMOTE_ARCHIVE" "${WHERE[@]}" --worker=all
    [[ $DRY_RUN == 1 ]] || rm -f "$archive"
    fetch="rm -rf ~/$REMOTE_DIR; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/$REMOTE_ARCHIVE -C ~/$REMOTE_DIR"
  fi
  # pip falls back to a user install on the TPU image; `python` may be missing there,
  # so ~/.local/bin gets a python -> python3 link for commands that say `python`.
  install="set -euo pipefail; $fetch; cd ~/$REMOTE_DIR; python3 -m pip install -U pip;"
  install+=" python3 -m pip install -c requirements/constraints.txt \"jax[tpu]\";"
  install+=" python3 -m pip install -c requirements/constraints.txt -e \".[data]\";"
  install+=" mkdir -p ~/.local/bin; command -v python >/dev/null || ln -sf \"\$(command -v python3)\" ~/.local/bin/python"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$install"
}

run_everywhere() {
  local exports="PATH=\"\$HOME/.local/bin:\$PATH\" RRCM_DISTRIBUTED=1" kv
  for kv in "${ENV_VARS[@]}"; do
    exports+=" ${kv%%=*}=$(quote_word "${kv#*=}")"
  done
  local remote="set -o pipefail; cd ~/$REMOTE_DIR; mkdir -p ~/rrcm-logs; export $exports;"
  remote+=" { $(quote_words "${USER_CMD[@]}"); } 2>&1 | tee -a ~/rrcm-logs/worker-\"\$(hostname)\".log"
  [[ $DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all \
    --output-directory="$LOG_DIR" --command="$remote"
}

main() {
  parse_args "$@"
  validate_args
  local attempt=0 resumes=0 status
  while :; do
    ensure_slice
    ship_and_install
    status=0
    run_everywhere || status=$?
    [[ $status != 0 ]] || return 0
    if ((status == EX_PREEMPTED && resumes < MAX_RESUMES)); then
      resumes=$((resumes + 1))
      REUSE=0   # the slice may be going away: check it before running again
      note "the command was preempted (exit 75, checkpoint written); running it again to resume ($resumes of at most $MAX_RESUMES)"
      continue
    fi
    if ! worth_rerunning "$status"; then
      echo "$PROG: the command stopped on $NAME with exit status $status ($(describe_status "$status")); rerunning cannot help until that is fixed." >&2
      return "$status"
    fi
    if ((attempt >= MAX_RESTARTS)); then
      echo "$PROG: the command failed on $NAME (exit $status: $(describe_status "$status")); run the same launch again to resume from the workdir." >&2
      return "$status"
    fi
    attempt=$((attempt + 1))
    REUSE=0
    note "the command failed (exit $status); restart $attempt of $MAX_RESTARTS"
  done
}

main "$@"
