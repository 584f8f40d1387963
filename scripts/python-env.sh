# Sourced by scripts/test-python.sh and scripts/bench-python.sh: a virtual
# environment with maturin and pytest (plus the packages in $extra_pip),
# and the `cnse` wheel built from dataplane/python and installed into it.
# Sets $venv; expects $root (the repository) and a log function.
cache=${CNSE_CACHE:-$HOME/.cache/cnse-dp}
venv=$cache/py-venv
python=${PYTHON:-python3}

log "virtual environment ($venv)"
if [ ! -x "$venv/bin/python" ]; then
  mkdir -p "$cache"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  'maturin>=1.9.4,<2' 'pytest>=8,<10' ${extra_pip:-}

log "build and install the cnse wheel"
# maturin's build backend runs the `maturin` of the environment.
export PATH=$venv/bin:$PATH
# The SDK crate is outside the workspace; its build output stays under the
# workspace's target/ so rebuilds are incremental and nothing else is
# touched.
export CARGO_TARGET_DIR=$root/target/python
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-build-isolation --force-reinstall --no-deps "$root/dataplane/python"
"$venv/bin/python" -c 'import cnse, sys; print("cnse", cnse.__version__, "on Python", sys.version.split()[0])'
