#!/usr/bin/env bash
# buf's breaking-change check (FILE rules, buf.yaml) of the working tree's protos against main:
# the merge base of HEAD with origin/main (else main). On a branch that is where the branch left
# main, so every commit of the branch is checked, not only the last one; on main itself it is
# HEAD, so uncommitted edits are checked. BUF_AGAINST=<git ref> compares with any other commit
# (e.g. the commit before a push).
# When there is nothing to compare with (no main, a shallow clone that lacks the merge base, a base
# without the proto) it says why; it fails then only if REQUIRE_BREAKING_CHECK=1 (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."

cannot() {
  echo "buf breaking: NOT RUN: $1" >&2
  if [ "${REQUIRE_BREAKING_CHECK:-0}" = 1 ]; then
    echo "buf breaking: REQUIRE_BREAKING_CHECK=1, so this is a failure" >&2
    exit 1
  fi
  exit 0
}

git rev-parse --git-dir >/dev/null 2>&1 || cannot "not a git checkout"

if [ -n "${BUF_AGAINST:-}" ]; then
  base=$(git rev-parse --verify --quiet "${BUF_AGAINST}^{commit}") || cannot "BUF_AGAINST=$BUF_AGAINST is not a commit here"
  what="$BUF_AGAINST"
else
  main=""
  for ref in origin/main main; do
    if git rev-parse --verify --quiet "$ref^{commit}" >/dev/null; then
      main=$ref
      break
    fi
  done
  if [ -z "$main" ]; then
    cannot "no branch main or origin/main to compare with (git fetch origin main, or set BUF_AGAINST=<ref>)"
  fi
  if ! base=$(git merge-base HEAD "$main" 2>/dev/null); then
    if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
      cannot "shallow clone: the merge base of HEAD and $main is not in the history (git fetch --unshallow)"
    fi
    cannot "HEAD and $main share no history"
  fi
  what="merge base of HEAD and $main"
fi

short=$(git rev-parse --short "$base")
if ! git cat-file -e "$base:protos" 2>/dev/null; then
  cannot "$what ($short) has no protos/ to compare with"
fi
echo "== buf breaking against $what ($short)"
# The base's protos are exported to a directory (with today's buf.yaml, which names the module), so
# the same command works in a shallow clone, where buf cannot clone the repository itself.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$base" protos | tar -x -C "$tmp"
cp buf.yaml "$tmp/"
buf breaking --against "$tmp"
