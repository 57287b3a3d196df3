# shellcheck shell=bash
# Shell helpers shared by the launch scripts (sourced, not run):
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# The sourcing script sets PROG (its name, for messages) before calling die.

# One line "PROG: message" on stderr, exit status 2 (a usage error).
die() {
  echo "$PROG: $*" >&2
  exit 2
}

# The sourcing script's header comment (line 2 up to `set -euo pipefail`) as help text.
header_help() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

# Prints one word so that a POSIX shell reads it back unchanged: bare when safe,
# `--flag='value'` for a flag with a value, single-quoted otherwise.
quote_word() {
  local word=$1 flag value
  if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$word"
  elif [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    flag=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
    printf '%s' "$flag"
    quote_word "$value"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Prints the words space-separated, each quoted by quote_word (no newline).
quote_words() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=" "
  done
}

# Exit statuses of the rrcm-jax commands (rrcm_jax/cli.py): 75 means preempted with a
# checkpoint written, so running the same command again resumes; 2 (bad input), 65 (no
# intact checkpoint) and 69 (workdir in use) cannot be cured by running it again.
readonly EX_PREEMPTED=75

# A few words on an rrcm-jax exit status, for messages.
describe_status() {
  case $1 in
    0) echo "finished" ;;
    2) echo "bad input: the message above says what to change" ;;
    65) echo "no intact checkpoint to resume from" ;;
    69) echo "the workdir is in use by another run" ;;
    75) echo "preempted, checkpoint written: rerun to resume" ;;
    *) echo "failed" ;;
  esac
}

# Whether running the same command again can help after exit status $1.
worth_rerunning() {
  case $1 in
    0 | 2 | 65 | 69) return 1 ;;
    *) return 0 ;;
  esac
}

# run_resuming NAME MAX COMMAND...: runs COMMAND, and runs it again while it exits 75
# (preempted, checkpoint written: the rerun resumes), at most MAX times; returns its last
# exit status. Each rerun is announced on stderr.
run_resuming() {
  local name=$1 max=$2 resumes=0 status
  shift 2
  while :; do
    status=0
    "$@" || status=$?
    if [[ $status != "$EX_PREEMPTED" ]] || ((resumes >= max)); then
      return "$status"
    fi
    resumes=$((resumes + 1))
    echo "${PROG:-rrcm}: $name was preempted (exit 75, checkpoint written); running it again to resume ($resumes of at most $max)." >&2
  done
}

# run_forwarding COMMAND...: runs COMMAND as a child and passes SIGTERM and SIGINT on to
# it (a scheduler's preemption notice reaches the trainer, which checkpoints and exits
# 75); returns COMMAND's exit status. Sets STOP_REQUESTED=1 when this script was signalled.
STOP_REQUESTED=0
FORWARD_CHILD=""     # the running COMMAND's pid, once known
FORWARD_PENDING=""   # a signal that came before it was known
FORWARD_SIGNALLED=0   # set by each signal passed on
forward_signal() {
  STOP_REQUESTED=1 FORWARD_SIGNALLED=1
  if [ -n "$FORWARD_CHILD" ]; then
    kill "-$1" "$FORWARD_CHILD" 2>/dev/null || true
  else
    FORWARD_PENDING=$1
  fi
}
run_forwarding() {
  local child status=0
  FORWARD_CHILD="" FORWARD_PENDING="" FORWARD_SIGNALLED=0
  # The traps come before the child starts: a signal in between is held, then passed on.
  trap "forward_signal TERM" TERM
  trap "forward_signal INT" INT
  # Without job control bash starts a background command with SIGINT ignored; the child
  # gets the default back, so a passed-on SIGINT (Ctrl-C) reaches it.
  (trap - INT; exec "$@") &
  child=$!
  FORWARD_CHILD=$child
  if [ -n "$FORWARD_PENDING" ]; then
    kill "-$FORWARD_PENDING" "$child" 2>/dev/null || true
  fi
  wait "$child" || status=$?
  # A trapped signal ends `wait` early with 128 + its number, while the child is still
  # checkpointing or has just exited: wait again for the child's own status (bash keeps it).
  while ((status > 128 && FORWARD_SIGNALLED)); do
    FORWARD_SIGNALLED=0
    status=0
    wait "$child" || status=$?
  done
  trap - TERM INT
  FORWARD_CHILD=""
  return "$status"
}
