#!/bin/sh
# The C++ compiler for every `cc` build of this workspace (set as CXX in .cargo/config.toml).
#
# tch/torch-sys 0.26 ship C++ wrappers generated for libtorch 2.13 and compile them with
# -std=c++17. ferrotorch builds against the torch the user already has (2.11 - 2.15), so for
# a C++ file that includes torch's headers this wrapper:
#   * reads the torch version from the headers (torch/headeronly/version.h);
#   * from torch 2.14 on, compiles with -std=c++20 (their headers refuse anything older),
#     torch-sys's C++ and build.rs's shim alike, so the threshold lives here only;
#   * force-includes torch_compat.h into torch-sys's generated wrappers, which defines the
#     ops a torch version renamed or removed, so every atg_* symbol tch declares exists, and
#     stamps their build directory with the torch version (checked by build.rs).
# Everything else goes to the real compiler unchanged ($FERROTORCH_REAL_CXX, default c++).
set -eu
real=${FERROTORCH_REAL_CXX:-c++}
here=$(cd "$(dirname "$0")" && pwd)

version=
generated=
out=
prev=
for arg in "$@"; do
  dir=
  case "$prev" in -I|-isystem) dir=$arg ;; -o) out=$arg ;; esac
  case "$arg" in -I?*) dir=${arg#-I} ;; esac
  if [ -n "$dir" ] && [ -z "$version" ]; then
    # torch >= 2.10 keeps the numbers in headeronly/version.h, older ones in version.h.
    for header in "$dir/torch/headeronly/version.h" "$dir/torch/version.h"; do
      if [ -z "$version" ] && [ -f "$header" ]; then
        version=$(sed -n 's/^#define TORCH_VERSION_\(MAJOR\|MINOR\|PATCH\) \([0-9]*\).*/\2/p' "$header" | paste -sd.)
      fi
    done
  fi
  case "$arg" in *torch_api_generated.cpp) generated=1 ;; esac
  prev=$arg
done

if [ -z "$version" ]; then
  exec "$real" "$@"
fi
minor=$(echo "$version" | cut -d. -f2)

std=-std=c++17
[ "$minor" -ge 14 ] && std=-std=c++20
extra="-include $here/torch_compat.h"  # used for the generated wrappers only

# Rebuild the argument list with the C++ standard replaced (POSIX sh has no arrays).
n=$#
i=0
while [ "$i" -lt "$n" ]; do
  arg=$1
  shift
  case "$arg" in -std=c++17|-std=c++14|-std=gnu++17) arg=$std ;; esac
  set -- "$@" "$arg"
  i=$((i + 1))
done
if [ -z "$generated" ]; then
  exec "$real" "$@"
fi
# shellcheck disable=SC2086  # $extra is two words on purpose
"$real" $extra "$@"
# Stamp torch-sys's build directory with the torch its wrappers were compiled against:
# build.rs refuses to link them against another (a target directory reused across torches).
[ -n "$out" ] && echo "$version" > "$(dirname "$out")/ferrotorch-torch-version"
exit 0
