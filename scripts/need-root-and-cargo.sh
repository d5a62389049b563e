# Sourced by scripts/demo.sh and scripts/test.sh, which need root (they
# install packages, load BPF programs, make namespaces) and cargo.  It
# makes both work however they are started:
#
# - from a root shell, whether sudo is installed or not;
# - from a user's shell: they run again under sudo, with the user's Rust
#   toolchain (PATH, CARGO_HOME, RUSTUP_HOME), which sudo's secure_path
#   and its HOME=/root would otherwise hide;
# - as `sudo scripts/…`: the toolchain of $SUDO_USER is found in that
#   user's ~/.cargo/bin (and ~/.rustup).
#
# Run as root on a user's behalf, it gives back to that user what the run
# wrote into the user's clone and toolchain.
#
# When root or cargo cannot be had, it says what is needed and how to get
# it, and exits 1.  SFUNNEL_ENTRY_DRY_RUN=1 stops once both are found,
# saying what it found, before anything is installed or built.

# The Rust version Cargo.toml's rust-version asks for.
SFUNNEL_MIN_RUST=1.82

# need_root_and_cargo SCRIPT [ARGS…]: returns as root with cargo on PATH,
# or re-executes SCRIPT under sudo, or exits.
need_root_and_cargo() {
  local script=$1 name
  shift
  name=scripts/$(basename "$script")

  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      # sudo resets the environment: carry over PATH (where cargo is), the
      # toolchain's homes, and the knobs the scripts and tests read.
      local -a keep=("PATH=$PATH")
      local v
      if [ -n "${CARGO_HOME:-}" ] || [ -d "$HOME/.cargo" ]; then keep+=("CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}"); fi
      if [ -n "${RUSTUP_HOME:-}" ] || [ -d "$HOME/.rustup" ]; then keep+=("RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}"); fi
      while read -r v; do
        case $v in
          CARGO_HOME | RUSTUP_HOME) ;;
          SFUNNEL_* | VMTEST_* | CARGO_* | RUSTUP_* | RUSTFLAGS | CI | K8S_VERSIONS) keep+=("$v=${!v}") ;;
        esac
      done < <(compgen -e)
      echo "$name: needs root; running it again with sudo (keeping your PATH, CARGO_HOME and RUSTUP_HOME)" >&2
      exec sudo env "${keep[@]}" "$script" "$@"
    fi
    cat >&2 <<EOF
$name: needs root (it installs packages with apt, loads BPF programs and
makes network namespaces), and this is user $(id -un) without sudo.
  Run it from a root shell:  su -c '$script'   (or log in as root)
  or, as root, install sudo: apt-get install sudo; usermod -aG sudo $(id -un)
  and log in again.
EOF
    exit 1
  fi

  # Root.  Under sudo, or from `su` without a login shell, PATH may lack
  # the toolchain: look where rustup puts it.
  if ! command -v cargo >/dev/null 2>&1; then
    local home="" d
    if [ -n "${SUDO_USER:-}" ]; then
      home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    fi
    for d in ${CARGO_HOME:+"$CARGO_HOME"} ${home:+"$home/.cargo"} "$HOME/.cargo"; do
      if [ -x "$d/bin/cargo" ]; then
        export PATH="$d/bin:$PATH"
        export CARGO_HOME=${CARGO_HOME:-$d}
        # rustup's cargo finds its toolchains through RUSTUP_HOME, which
        # defaults to $HOME/.rustup: root's, not the user's.
        if [ -z "${RUSTUP_HOME:-}" ] && [ -d "${d%/.cargo}/.rustup" ]; then
          export RUSTUP_HOME="${d%/.cargo}/.rustup"
        fi
        break
      fi
    done
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<EOF
$name: cargo not found (looked on PATH${SUDO_USER:+, in ~$SUDO_USER/.cargo/bin} and in $HOME/.cargo/bin).
sfunnel is built with a Rust toolchain, $SFUNNEL_MIN_RUST or newer.  Install it with rustup:
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
then open a new shell (or run: . "\$HOME/.cargo/env") and run $name again.
(Debian 12's own cargo package is 1.63, too old.)
EOF
    exit 1
  fi
  local version
  if ! version=$(cargo --version 2>&1); then
    cat >&2 <<EOF
$name: $(command -v cargo) does not run:
$version
If it is rustup's and has no toolchain yet: rustup default stable
EOF
    exit 1
  fi
  version=$(awk '{print $2}' <<<"$version")
  if [ "$(printf '%s\n' "$SFUNNEL_MIN_RUST" "${version%%-*}" | sort -V | head -n 1)" != "$SFUNNEL_MIN_RUST" ]; then
    echo "$name: cargo $version at $(command -v cargo) is too old: sfunnel needs Rust $SFUNNEL_MIN_RUST or newer (rustup update stable)" >&2
    exit 1
  fi
  # Root on behalf of a user (sudo): what the run writes into the user's
  # clone (target/, vmtest/cache) and toolchain (CARGO_HOME, RUSTUP_HOME)
  # would stay root's and break the user's next cargo build.  The script
  # runs as a child, and then those files are handed back to the user.
  local owner=${SUDO_UID:-}
  if [ -n "$owner" ] && [ "$owner" != 0 ] && [ -z "${SFUNNEL_OWNER_CHILD:-}" ]; then
    local repo group=${SUDO_GID:-$owner} rc=0 d
    repo=$(cd "$(dirname "$script")/.." && pwd)
    SFUNNEL_OWNER_CHILD=1 "$script" "$@" || rc=$?
    for d in "$repo" ${CARGO_HOME:+"$CARGO_HOME"} ${RUSTUP_HOME:+"$RUSTUP_HOME"}; do
      if [ -d "$d" ] && [ "$(stat -c %u "$d")" = "$owner" ]; then
        find "$d" -xdev -uid 0 -exec chown -h "$owner:$group" {} + 2>/dev/null || true
      fi
    done
    exit "$rc"
  fi
  if [ "${SFUNNEL_ENTRY_DRY_RUN:-0}" = 1 ]; then
    echo "$name: dry run: root (uid $(id -u)${SUDO_USER:+, by sudo from $SUDO_USER}), cargo $version at $(command -v cargo)," \
      "CARGO_HOME=${CARGO_HOME:-unset} RUSTUP_HOME=${RUSTUP_HOME:-unset}; stopping before scripts/setup.sh"
    exit 0
  fi
}
