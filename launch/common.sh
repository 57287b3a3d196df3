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
