# Sourced by the scripts that make wheels for a device call (device_server_wheels.sh,
# device_ray_wheels.sh, device_owed_carry.sh): wheels at a lock's pins for the device's
# Python (3.12, manylinux x86_64), a check, before any device time is spent, that every
# package a carried wheel needs is carried too or in the device image, and the carried
# folders kept out of git.

# The packages of the device image (/work/.library/device/KINDS.md) that carried wheels
# need; a name missing here and from a carry set stops device_wheels_check.
DEVICE_HAS=" aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi cffi
  charset-normalizer click colorama filelock frozenlist fsspec grpcio h11 idna jinja2
  msgpack multidict numpy packaging prometheus-client propcache protobuf psutil pyyaml
  requests six torch transformers triton urllib3 uvloop wrapt yarl "
DEVICE_HAS=" $(echo $DEVICE_HAS) "  # one space between names

# device_wheels_download LOCK DIR NAME...: each NAME's wheel at LOCK's pin, into DIR
device_wheels_download() {
  local lock=$1 dir=$2 name pin pins=()
  shift 2
  for name in "$@"; do
    pin=$(grep -E "^${name}==" "$lock") || {
      echo "$name is not pinned in $lock" >&2
      return 1
    }
    pins+=("$pin")
  done
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "${pins[@]}" 2>&1 | { grep -v '^WARNING' || true; }
}

# device_wheels_check DIR NAME...: fails, naming them, when a wheel in DIR needs (without
# extras, on Python 3.12) a package that is neither one of NAME... nor in DEVICE_HAS
device_wheels_check() {
  local dir=$1 wheel need carried missing=()
  # a marker that Python 3.12 does not meet: version < 3.0 .. 3.12 (3.11.3 and the like)
  local older_python="python_(full_)?version *< *['\"]3\.([0-9]|1[0-2])(\.[0-9]+)?['\"]"
  shift
  carried=" $* "
  for wheel in "$dir"/*.whl; do
    while read -r need; do
      [[ -z $need || $carried == *" $need "* || $DEVICE_HAS == *" $need "* ]] && continue
      missing+=("$(basename "$wheel"): $need")
    done < <(unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist:' \
             | grep -v 'extra ==' | grep -v -E "$older_python" \
             | sed -E 's/^Requires-Dist: *([A-Za-z0-9._-]+).*/\1/' | tr 'A-Z_.' 'a-z--')
  done
  if [ ${#missing[@]} -gt 0 ]; then
    printf 'needed, neither carried nor on the device: %s\n' "${missing[@]}" >&2
    return 1
  fi
}

# device_wheels_ignore DIR...: keep these carried folders out of git (.git/info/exclude)
device_wheels_ignore() {
  local dir
  for dir in "$@"; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
  done
}
