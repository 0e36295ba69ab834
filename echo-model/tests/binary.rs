//! The `echo-model` binary: banner, serving, clean exit on SIGTERM, refusing a missing key env.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child by PID if the test fails midway, so no process outlives the test.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn prints_the_local_echo_banner_and_exits_cleanly_on_sigterm() {
    let child = Command::new(env!("CARGO_BIN_EXE_echo-model"))
        .args(["--http-addr", "127.0.0.1:0", "--media-ip", "127.0.0.1"])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stderr = guard.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !banner.contains("/v1/realtime/calls") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("banner within 10 s");
        banner.push_str(&line);
        banner.push('\n');
    }
    assert!(banner.contains("LOCAL ECHO MODEL"), "{banner}");
    assert!(banner.contains("NOT a real model"), "{banner}");

    let pid = guard.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let status = wait_exit(&mut guard.0, Duration::from_secs(10)).expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn refuses_to_start_when_the_key_variable_is_missing() {
    let child = Command::new(env!("CARGO_BIN_EXE_echo-model"))
        .args([
            "--http-addr",
            "127.0.0.1:0",
            "--api-key-env",
            "ECHO_MODEL_TEST_KEY_THAT_IS_NOT_SET",
        ])
        .env_remove("ECHO_MODEL_TEST_KEY_THAT_IS_NOT_SET")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let status = wait_exit(&mut guard.0, Duration::from_secs(10)).expect("exits by itself");
    assert!(!status.success());
}
