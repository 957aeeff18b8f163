//! The browser client (`gateway/web`): its unit tests in Node's test runner,
//! its TypeScript declarations (`tsc`), its npm package, the dev-mode routes,
//! and end-to-end scenarios in headless Chromium (and one in headless Firefox)
//! against real gateway processes (and a real 3-node NATS cluster where two
//! gateways are joined).
//!
//! Node 22+, playwright-core, puppeteer-core, typescript, Chromium and
//! Firefox ESR are installed by `scripts/ensure-web.sh` when missing (run
//! from here, once per test binary). A scenario that cannot launch its
//! browser fails; nothing is skipped.
//! Scenario scripts live in `gateway/web/test/e2e/`; the screenshot of the
//! demo page is written to `$CARGO_TARGET_TMPDIR/browser/demo.png`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use common::nats::Cluster;
use common::process::GatewayProcess as Gateway;
use common::{Client, http_get};
use serde_json::{Value, json};

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The test output folder (screenshots).
fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Node 22+ and the folder holding playwright-core and typescript, installed
/// when missing by `scripts/ensure-web.sh`.
struct Tools {
    node: PathBuf,
    dir: PathBuf,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let out = Command::new(repo_dir().join("scripts/ensure-web.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("scripts/ensure-web.sh runs");
        assert!(
            out.status.success(),
            "scripts/ensure-web.sh failed: Node 22+, playwright-core, typescript and Chromium are needed"
        );
        let node = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Tools {
            node,
            dir: repo_dir().join(".tools/web"),
        }
    })
}

/// One browser at a time: the machine has two cores.
fn browser_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

// ---- the SDK without a browser -----------------------------------------------

#[test]
fn client_unit_tests_pass_in_the_node_test_runner() {
    let t = tools();
    let mut files: Vec<PathBuf> = std::fs::read_dir(web_dir().join("test/unit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let out = run(Command::new(&t.node).arg("--test").args(&files).current_dir(web_dir()));
    println!("{out}");
    assert!(out.contains("# fail 0"), "{out}");
}

#[test]
fn typescript_declarations_compile_against_their_usage() {
    let t = tools();
    run(Command::new(&t.node)
        .arg(t.dir.join("node_modules/typescript/bin/tsc"))
        .args(["-p", "."])
        .current_dir(web_dir()));
}

/// `npm pack` makes a package that installs (from the tarball alone) and
/// imports in Node 22 by its name.
#[test]
fn npm_pack_makes_an_installable_package() {
    let t = tools();
    let tmp = tempfile::tempdir().unwrap();
    let out = run(Command::new("npm")
        .args(["pack", "--json", "--pack-destination"])
        .arg(tmp.path())
        .current_dir(web_dir()));
    let json_start = out.find('[').unwrap();
    let packed: Value = serde_json::Deserializer::from_str(&out[json_start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    let files: Vec<&str> = packed[0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files.contains(&"client.js") && files.contains(&"client.d.ts"),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|f| f.starts_with("test/")),
        "tests are not shipped: {files:?}"
    );
    let tarball = tmp.path().join(packed[0]["filename"].as_str().unwrap());
    let app = tmp.path().join("app");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("package.json"), r#"{"private":true,"type":"module"}"#).unwrap();
    run(Command::new("npm")
        .args(["install", "--offline", "--no-audit", "--no-fund"])
        .arg(&tarball)
        .current_dir(&app));
    std::fs::write(
        app.join("main.mjs"),
        "import { Client, backoffDelay, PROTOCOL } from '@gateway-chat/client';\n\
         const c = new Client('ws://127.0.0.1:9/ws', { token: 't' });\n\
         console.log(PROTOCOL, typeof WebSocket, c.state, backoffDelay(2, 100, 1000, () => 0.5));\n",
    )
    .unwrap();
    let out = run(Command::new(&t.node).arg("main.mjs").current_dir(&app));
    assert_eq!(out.trim(), "gw.v1.json function disconnected 200");
}

/// Runs `gateway/web/test/e2e/<scenario>.mjs` with `config`, answering its
/// "@@ kill a" / "@@ restart a" requests on `gateways` (by letter, in
/// order). Panics with the scenario's output unless it passed.
fn scenario(name: &str, config: Value, gateways: &mut [&mut Gateway]) {
    let t = tools();
    let _one = browser_lock();
    let mut child = Command::new(&t.node)
        .arg(web_dir().join(format!("test/e2e/{name}.mjs")))
        .env("E2E_CONFIG", config.to_string())
        .env("E2E_TOOLS", &t.dir)
        .env("CHROMIUM", "/usr/bin/chromium")
        .env("FIREFOX", "/usr/bin/firefox-esr")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node starts");
    let mut stdin = child.stdin.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
            .join("\n")
    });
    let mut output = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        println!("[{name}] {line}");
        if let Some(request) = line.strip_prefix("@@ ") {
            let (verb, which) = request.split_once(' ').expect("@@ <verb> <gateway>");
            let g = &mut gateways[(which.as_bytes()[0] - b'a') as usize];
            match verb {
                "kill" => g.kill(),
                "restart" => g.restart(),
                other => panic!("unknown request {other}"),
            }
            writeln!(stdin, "ok").unwrap();
        }
        output.push(line);
    }
    let status = child.wait().unwrap();
    let errors = errors.join().unwrap();
    if !status.success() {
        for g in gateways.iter() {
            eprintln!("--- gateway {} log (tail) ---", g.addr);
            let logs = g.logs();
            eprintln!("{}", &logs[logs.len().saturating_sub(4000)..]);
        }
    }
    assert!(
        status.success() && output.iter().any(|l| l == "PASS"),
        "browser scenario {name} failed ({status}):\n{}\n{errors}",
        output.join("\n")
    );
}

// ---- dev mode routes -----------------------------------------------------------

#[tokio::test]
async fn dev_mode_serves_the_demo_and_tokens_and_never_with_a_key() {
    let dev = Gateway::start(&[]);
    let banner = dev.log_with("Production:");
    assert!(banner.contains("DEV MODE") && banner.contains("/dev/token"), "{banner}");
    assert!(
        banner.contains(&format!("Demo chat:    http://{}/", dev.addr)),
        "{banner}"
    );
    let (status, page) = http_get(&format!("{}/", dev.http())).await;
    assert_eq!(status, 200);
    assert!(page.contains("/demo.js"), "{page}");
    let (status, js) = http_get(&format!("{}/demo.js", dev.http())).await;
    assert_eq!(status, 200);
    assert!(js.contains("from '/client.js'"));
    // A token for any user; it connects, with every room granted.
    let (status, body) = http_get(&format!("{}/dev/token?sub=alice&ttl=60", dev.http())).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["expires_in"], 60);
    let mut c = Client::open(&dev.ws_url()).await;
    let r = c.connect(v["token"].as_str().unwrap()).await;
    let expires = r["ok"]["expires_in"].as_u64().unwrap();
    assert!((55..=60).contains(&expires), "{r}");
    let r = c.subscribe(&["anything-at-all"]).await;
    assert!(r["ok"]["rooms"][0]["offset"].is_u64(), "{r}");
    // A room token for a room the connection token does not need.
    let (status, body) = http_get(&format!("{}/dev/token?sub=alice&room=team-7", dev.http())).await;
    assert_eq!(status, 200, "{body}");
    let room_token: Value = serde_json::from_str(&body).unwrap();
    let r = c
        .request(json!({"op":"subscribe","rooms":[{"room":"team-7","token":room_token["token"]}]}))
        .await;
    assert!(r["ok"]["rooms"][0]["offset"].is_u64(), "{r}");
    // Bad input: 400 with the protocol's error shape.
    for q in [
        "",
        "?sub=",
        "?sub=a%20b",
        "?sub=alice&ttl=1",
        "?sub=alice&ttl=99999",
        "?sub=alice&ttl=x",
        "?sub=a&room=a.b",
    ] {
        let (status, body) = http_get(&format!("{}/dev/token{q}", dev.http())).await;
        assert_eq!(status, 400, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{q}");
    }

    // With a key configured: no demo, no token endpoint, no banner; the SDK stays.
    let prod = Gateway::start(&["--jwt-secret", common::SECRET]);
    let (status, _) = http_get(&format!("{}/healthz", prod.http())).await;
    assert_eq!(status, 200);
    assert!(!prod.logs().contains("DEV MODE"), "{}", prod.logs());
    for path in ["/", "/dev/token?sub=alice", "/demo.js"] {
        let (status, _) = http_get(&format!("{}{path}", prod.http())).await;
        assert_eq!(status, 404, "{path}");
    }
    for g in [&dev, &prod] {
        let (status, js) = http_get(&format!("{}/client.js", g.http())).await;
        assert_eq!(status, 200);
        assert!(js.contains("export class Client"));
        let (status, dts) = http_get(&format!("{}/client.d.ts", g.http())).await;
        assert_eq!(status, 200);
        assert!(dts.contains("export declare class Client"));
    }
}

// ---- browser scenarios ------------------------------------------------------------

/// Two pages (alice, bob) chat through one gateway; bob's background room
/// counts alice's messages as unread. Writes the demo screenshot.
#[test]
fn two_users_chat_and_a_background_room_counts_unread() {
    let mut a = Gateway::start(&[]);
    let shot = out_dir().join("demo.png");
    let _ = std::fs::remove_file(&shot);
    let base = a.http();
    scenario(
        "chat",
        json!({"alice": base, "bob": base, "screenshot": shot}),
        &mut [&mut a],
    );
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{}",
        png.len()
    );
    println!("screenshot: {}", shot.display());
}

/// The same across two gateways joined by a 3-node NATS cluster: alice on
/// one, bob on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_across_two_gateways_joined_by_nats() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let mut a = Gateway::start(&["--nats", &urls, "--node-id", "gw-a"]);
    let mut b = Gateway::start(&["--nats", &urls, "--node-id", "gw-b"]);
    let config = json!({"alice": a.http(), "bob": b.http(), "screenshot": null});
    tokio::task::block_in_place(|| scenario("chat", config, &mut [&mut a, &mut b]));
}

/// Gateway A (the page's) is killed with SIGKILL and started again while
/// the SDK in Node keeps publishing on gateway B: the page reconnects by
/// itself and shows every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_rejoins_a_restarted_gateway_and_shows_every_missed_message_once_in_order() {
    let cluster = Cluster::start(3).await;
    let urls = cluster.urls();
    let mut a = Gateway::start(&["--nats", &urls, "--node-id", "gw-a"]);
    let mut b = Gateway::start(&["--nats", &urls, "--node-id", "gw-b"]);
    let config = json!({"page": a.http(), "publisher": b.http(), "total": 60});
    tokio::task::block_in_place(|| scenario("reconnect", config, &mut [&mut a, &mut b]));
}

/// A 6-second token is refreshed over the open connection past its expiry
/// (plus the 5 s leeway): no disconnect, the same connection.
#[test]
fn a_token_expiring_during_the_test_is_refreshed_without_a_disconnect() {
    let mut a = Gateway::start(&[]);
    let config = json!({"url": a.http(), "ttl": 6});
    scenario("refresh", config, &mut [&mut a]);
}

/// The demo over https:// and wss:// with a self-signed certificate.
#[test]
fn the_demo_works_over_wss_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let mut a = Gateway::start(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    a.log_with("Demo chat:    https://");
    let config = json!({"url": format!("https://{}", a.addr)});
    scenario("tls", config, &mut [&mut a]);
}

/// The client in Firefox (Debian's firefox-esr over WebDriver BiDi): two
/// pages served by one dev-mode gateway chat both ways, a background room
/// counts unread messages from notify-mode activity, and the SDK's state
/// events follow a SIGKILL and restart of the gateway (disconnected with
/// 1006, reconnected by itself, chat goes on) and a close by the app.
#[test]
fn the_client_works_in_firefox_two_pages_chat_count_unread_and_report_state() {
    let mut a = Gateway::start(&[]);
    let shot = out_dir().join("demo-firefox.png");
    let _ = std::fs::remove_file(&shot);
    let config = json!({"url": a.http(), "screenshot": shot});
    scenario("firefox", config, &mut [&mut a]);
    let png = std::fs::read(&shot).expect("the Firefox screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{}", png.len());
}
