#!/usr/bin/env bash
# Installs everything MoKA needs to build on a fresh Debian 12 machine (as root)
# and builds Kokkos + Kokkos Kernels 3.4.01 from Debian's own trilinos 13.2.0
# source package.
#
#   scripts/setup-deps.sh [host|cuda]...     (default: host)
#   scripts/setup-deps.sh --apt-only         (system packages only)
#
#   host  Kokkos with OpenMP + Serial, Kokkos Kernels on top with OpenBLAS
#         as its BLAS (CPU machines).
#   cuda  Kokkos with CUDA (sm_90, Hopper) + OpenMP host, Kokkos Kernels with
#         cuBLAS as BLAS TPL, built with the toolkit in $CUDA_HOME
#         (default /usr/local/cuda).
#
# Results land in $MOKA_DEPS_PREFIX (default ~/.cache/moka) as
#   $MOKA_DEPS_PREFIX/kokkos-3.4.01-<backend>/ (an install prefix for CMake).
# A stamp file records the script and patch hashes; a second run with the
# same inputs does nothing and takes seconds.
#
# Environment:
#   MOKA_DEPS_PREFIX   where to put sources and installs
#   MOKA_SKIP_APT=1    do not call apt-get (packages already present)
#   MOKA_JOBS          parallel build jobs (default: nproc)
#   CUDA_HOME          CUDA toolkit root (default /usr/local/cuda)
set -euo pipefail
shopt -s nullglob

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
prefix_root=${MOKA_DEPS_PREFIX:-${HOME}/.cache/moka}
jobs=${MOKA_JOBS:-$(nproc)}
cuda_home=${CUDA_HOME:-/usr/local/cuda}
kokkos_version=3.4.01
trilinos_debver=13.2.0-4
# Checksum of the upstream tarball as Debian ships it (trilinos_13.2.0.orig.tar.gz).
# apt checks it against the signed Sources index too; this pins the exact bytes.
trilinos_sha256=0ddb47784ba7b8a6b9a07a4822b33be508feb4ccd54301b2a5d10c9e54524b90

backends=("$@")
apt_only=0
if [ "${1:-}" = --apt-only ]; then apt_only=1; backends=(); fi
[ ${#backends[@]} -eq 0 ] && [ $apt_only = 0 ] && backends=(host)
for b in "${backends[@]}"; do
  case "$b" in host|cuda) ;; *) echo "setup-deps: unknown backend '$b' (expected host or cuda)" >&2; exit 2;; esac
done

log() { printf '[setup-deps] %s\n' "$*"; }

# ---------------------------------------------------------------- apt packages
apt_packages=(build-essential cmake ninja-build pkg-config git ca-certificates
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools libgtest-dev libopenblas-openmp-dev libopenblas0-pthread
  dpkg-dev xz-utils python3-matplotlib python3-h5py)
install_apt() {
  [ "${MOKA_SKIP_APT:-0}" = 1 ] && return 0
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "apt packages present"; return 0; }
  log "installing: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "setup-deps: need root for apt-get (or set MOKA_SKIP_APT=1)" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ------------------------------------------------ Debian source of trilinos
# Source entries are derived from the machine's own binary entries
# (deb -> deb-src), in a private apt state directory, so the system's
# configuration is left untouched.
fetch_sources() {
  local srcdir=$prefix_root/src
  local tree=$srcdir/trilinos-13.2.0
  local want; want=$(stamp_of)
  if [ -f "$tree/.extracted" ] && [ "$(cat "$tree/.extracted")" = "$want" ]; then return 0; fi
  mkdir -p "$srcdir"
  local tarball=$srcdir/trilinos_13.2.0.orig.tar.gz
  if [ ! -f "$tarball" ] || ! echo "$trilinos_sha256  $tarball" | sha256sum -c --quiet - 2>/dev/null; then
    local aptdir=$srcdir/apt
    rm -rf "$aptdir"; mkdir -p "$aptdir/lists/partial" "$aptdir/parts"
    local n=0
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      # deb822 files: turn "Types: deb" into "Types: deb-src"
      sed -e 's/^Types:.*$/Types: deb-src/' "$f" > "$aptdir/parts/moka-src-$n.sources"; n=$((n+1))
    done
    if [ -f /etc/apt/sources.list ]; then
      grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$aptdir/parts/moka-src.list" || true
    fi
    for f in /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      grep -E '^deb ' "$f" | sed 's/^deb /deb-src /' >> "$aptdir/parts/moka-src.list" || true
    done
    local O=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$aptdir/parts"
             -o "Dir::State::Lists=$aptdir/lists" -o APT::Sandbox::User=root)
    log "fetching trilinos=$trilinos_debver sources with apt-get source"
    apt-get "${O[@]}" update -qq
    (cd "$srcdir" && apt-get "${O[@]}" source --download-only "trilinos=$trilinos_debver")
  fi
  echo "$trilinos_sha256  $tarball" | sha256sum -c --quiet - || {
    echo "setup-deps: checksum mismatch for $tarball (expected $trilinos_sha256)" >&2; exit 1; }
  log "extracting packages/kokkos and packages/kokkos-kernels"
  rm -rf "$tree"; mkdir -p "$tree"
  tar -xzf "$tarball" -C "$tree" --strip-components=2 \
    Trilinos-trilinos-release-13-2-0/packages/kokkos \
    Trilinos-trilinos-release-13-2-0/packages/kokkos-kernels
  # The CUDA 12/13 fixes; each is guarded so older toolkits keep the old path.
  for p in "$root"/patches/kokkos-3.4.01/*.patch; do
    [ -f "$p" ] || continue
    log "patch $(basename "$p")"
    patch -d "$tree" -p1 --quiet < "$p"
  done
  echo "$want" > "$tree/.extracted"
}

stamp_of() {
  cat "$here/setup-deps.sh" "$root"/patches/kokkos-3.4.01/*.patch | sha256sum | cut -c1-16
}

build_backend() {
  local backend=$1
  local tree=$prefix_root/src/trilinos-13.2.0
  local inst=$prefix_root/kokkos-$kokkos_version-$backend
  local stamp; stamp="$backend-$(stamp_of)"
  if [ -f "$inst/.moka-stamp" ] && [ "$(cat "$inst/.moka-stamp")" = "$stamp" ]; then
    log "kokkos ($backend) up to date in $inst"; return 0
  fi
  local bld=$prefix_root/build-$backend
  rm -rf "$bld" "$inst"
  local kokkos_opts=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_STANDARD=17
    -DCMAKE_INSTALL_PREFIX="$inst" -DCMAKE_INSTALL_LIBDIR=lib
    -DKokkos_ENABLE_SERIAL=ON -DKokkos_ENABLE_OPENMP=ON
    -DKokkos_ENABLE_TESTS=OFF -DKokkos_ENABLE_EXAMPLES=OFF)
  # Host builds: OpenBLAS as Kokkos Kernels' BLAS TPL (its own host GEMM is
  # several times slower). CUDA builds: cuBLAS, and no host BLAS, so the
  # bundle carries no dependency on the build machine's libraries.
  # The OpenMP build of OpenBLAS, named by its directory: it runs its GEMMs
  # on the OpenMP threads that Kokkos uses. The pthread build (Debian's
  # default alternative) keeps a second pool, and the two pools' spinning
  # threads took each other's cores: bench_cpu.deck 120 ms -> 86 ms.
  local kk_opts=()
  if [ "$backend" = host ]; then
    local blas_dir
    blas_dir=/usr/lib/$(gcc -print-multiarch)/openblas-openmp
    [ -f "$blas_dir/libopenblas.so" ] || { echo "setup-deps: no OpenMP OpenBLAS in $blas_dir (libopenblas-openmp-dev)" >&2; exit 1; }
    kk_opts=(-DKokkosKernels_ENABLE_TPL_BLAS=ON -DKokkosKernels_ENABLE_TPL_LAPACK=OFF
      -DBLAS_LIBRARIES=openblas -DBLAS_LIBRARY_DIRS="$blas_dir")
  fi
  if [ "$backend" = cuda ]; then
    [ -x "$cuda_home/bin/nvcc" ] || { echo "setup-deps: no nvcc in $cuda_home/bin" >&2; exit 1; }
    export PATH=$cuda_home/bin:$PATH CUDA_ROOT=$cuda_home
    kokkos_opts+=(-DKokkos_ENABLE_CUDA=ON -DKokkos_ARCH_HOPPER90=ON
      -DKokkos_ENABLE_CUDA_LAMBDA=ON -DKokkos_ENABLE_CUDA_CONSTEXPR=ON
      -DCMAKE_CXX_COMPILER="$tree/kokkos/bin/nvcc_wrapper")
    kk_opts+=(-DKokkosKernels_ENABLE_TPL_CUBLAS=ON -DKokkosKernels_ENABLE_TPL_CUSPARSE=OFF
      -DCUBLAS_ROOT="$cuda_home" -DKokkosKernels_CUBLAS_ROOT="$cuda_home")
  fi
  log "building kokkos $kokkos_version ($backend) with $jobs jobs"
  cmake -S "$tree/kokkos" -B "$bld/kokkos" -G Ninja "${kokkos_opts[@]}" > "$bld.kokkos.log" 2>&1 \
    || { tail -30 "$bld.kokkos.log"; exit 1; }
  cmake --build "$bld/kokkos" -j "$jobs" >> "$bld.kokkos.log" 2>&1 || { tail -40 "$bld.kokkos.log"; exit 1; }
  cmake --install "$bld/kokkos" >> "$bld.kokkos.log" 2>&1
  # Kokkos Kernels: no explicit instantiation at all (the few BLAS calls
  # MoKA makes are instantiated in its own translation units; with ETI on,
  # the CUDA build took 15 minutes and 112 MB), BLAS only, no cuSPARSE (its
  # sparse kernels are not used, and are wrong on Hopper). TEST_ETI_ONLY=OFF
  # lets the upstream unit tests instantiate what they test.
  log "building kokkos-kernels $kokkos_version ($backend, no ETI, BLAS only)"
  local kk_cxx=()
  [ "$backend" = cuda ] && kk_cxx=(-DCMAKE_CXX_COMPILER="$inst/bin/nvcc_wrapper")
  cmake -S "$tree/kokkos-kernels" -B "$bld/kk" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_CXX_STANDARD=17 -DCMAKE_INSTALL_PREFIX="$inst" -DCMAKE_INSTALL_LIBDIR=lib \
    -DKokkos_ROOT="$inst" "${kk_cxx[@]}" \
    -DKokkosKernels_ADD_DEFAULT_ETI=OFF -DKokkosKernels_INST_DOUBLE=OFF \
    -DKokkosKernels_INST_FLOAT=OFF -DKokkosKernels_INST_LAYOUTLEFT=OFF \
    -DKokkosKernels_INST_LAYOUTRIGHT=OFF -DKokkosKernels_INST_ORDINAL_INT=OFF \
    -DKokkosKernels_INST_OFFSET_INT=OFF -DKokkosKernels_INST_OFFSET_SIZE_T=OFF \
    -DKokkosKernels_ENABLED_COMPONENTS=BLAS \
    -DKokkosKernels_TEST_ETI_ONLY=OFF \
    -DKokkosKernels_ENABLE_TESTS=OFF -DKokkosKernels_ENABLE_EXAMPLES=OFF \
    "${kk_opts[@]}" > "$bld.kk.log" 2>&1 || { tail -30 "$bld.kk.log"; exit 1; }
  cmake --build "$bld/kk" -j "$jobs" >> "$bld.kk.log" 2>&1 || { tail -40 "$bld.kk.log"; exit 1; }
  cmake --install "$bld/kk" >> "$bld.kk.log" 2>&1
  echo "$stamp" > "$inst/.moka-stamp"
  rm -rf "$bld"
  log "installed $inst ($(du -sh "$inst" | cut -f1))"
}

install_apt
[ $apt_only = 1 ] && exit 0
need_build=0
for b in "${backends[@]}"; do
  inst=$prefix_root/kokkos-$kokkos_version-$b
  if [ ! -f "$inst/.moka-stamp" ] || [ "$(cat "$inst/.moka-stamp")" != "$b-$(stamp_of)" ]; then need_build=1; fi
done
if [ $need_build = 1 ]; then
  fetch_sources
  for b in "${backends[@]}"; do build_backend "$b"; done
else
  log "all requested Kokkos builds are up to date in $prefix_root"
fi
