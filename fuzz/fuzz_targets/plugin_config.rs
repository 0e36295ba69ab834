//! The plugin configuration parser (operators write it; a bad one must be refused with a
//! sentence, never crash the VM): any bytes, with a VM environment that has the variables
//! the seeds name. Property: it never panics, and an accepted configuration is usable (its
//! models name pools that exist, its paths start with `/`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_filter_core::Config;

fn env(name: &str) -> Option<String> {
    match name {
        "OPENAI_API_KEY" | "KEY_A" | "KEY_B" => Some("sk-fuzz-key-0123456789".into()),
        "EPHEMERAL_SIGNING_KEY" | "RELAY_REPLICA_KEY" => {
            Some("fuzz-signing-key-0123456789abcdef0123456789".into())
        }
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = Config::from_json(data, &env) {
        for m in &config.models {
            for p in &m.pools {
                assert!(
                    *p < config.pools.len(),
                    "a model names a pool that does not exist"
                );
            }
        }
        for path in [
            &config.calls_path,
            &config.live_path,
            &config.client_secrets_path,
        ] {
            assert!(path.starts_with('/'), "{path}");
        }
    }
});
