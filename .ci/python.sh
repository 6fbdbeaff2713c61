# Sourced by the lanes that build environments of their own: which interpreters this machine has.

# The interpreter for Python $1 if this machine has one (on PATH or through pyenv), else nothing.
find_python() {
  if command -v "python$1" >/dev/null 2>&1 && "python$1" -c "" >/dev/null 2>&1; then
    echo "python$1"
  elif command -v pyenv >/dev/null 2>&1; then
    local version
    version=$(pyenv versions --bare 2>/dev/null | grep -E "^$1\.[0-9]+$" | sort -V | tail -n 1 || true)
    if [ -n "$version" ]; then echo "$(pyenv root)/versions/$version/bin/python$1"; fi
  fi
}

# The newest Python that pyproject.toml's classifiers name and this machine has, else python3.
newest_python() {
  local version found
  for version in $(python3 .ci/floors.py --pythons); do
    found=$(find_python "$version")
    if [ -n "$found" ]; then
      echo "$found"
      return
    fi
  done
  echo python3
}
