//! Operating the sidecar: `/healthz`, `/readyz`, `/metrics`, JSON logs with the Mend-Id in the
//! message's span, and NATS authentication.

use mend_e2e::app::Reply;
use mend_e2e::mend::{MendProcess, listen_addr, refused, sidecar_config, with_top_level};
use mend_e2e::nats::NatsServer;
use mend_e2e::world::{TEST_TIMEOUT, World};

async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let r = reqwest::get(url).await?;
    Ok((r.status().as_u16(), r.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() -> anyhow::Result<()> {
    let mut w = World::new().await?;
    w.app
        .script(|d| match d.field("n").and_then(|v| v.as_u64()) {
            Some(1) => Reply::Status(422),
            Some(2) if d.seen_before == 0 => Reply::Status(503),
            _ => Reply::Ok,
        });
    w.publish_keyed(10, 10).await?;
    let config = w.keyed_config("ops", "backoff_initial = \"10ms\"");
    let base = format!("http://{}", listen_addr(&config));
    let _s = w.sidecar(&config).await?;
    w.app.wait_for_successes(9, TEST_TIMEOUT).await?;
    w.drained("ops").await?;

    assert_eq!(get(&format!("{base}/healthz")).await?.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await?.0, 200);
    let metrics = mend_e2e::wait::until("metrics to settle", TEST_TIMEOUT, || {
        let url = format!("{base}/metrics");
        async move {
            let (_, text) = get(&url).await?;
            let settled = text.contains("mend_delegated_total{service=\"ops\",binding=\"ops\"} 1")
                && text.contains("mend_held_keys{service=\"ops\",binding=\"ops\"} 1");
            Ok(settled.then_some(text))
        }
    })
    .await?;
    for line in [
        "mend_delivered_total{service=\"ops\",binding=\"ops\"} 9",
        "mend_failed_total{service=\"ops\",binding=\"ops\",kind=\"message\"} 1",
        "mend_failed_total{service=\"ops\",binding=\"ops\",kind=\"transient\"} 1",
        "mend_in_flight{service=\"ops\",binding=\"ops\"} 0",
        "mend_app_latency_seconds_count{service=\"ops\",binding=\"ops\"} 11",
        "# TYPE mend_app_latency_seconds histogram",
        "mend_held_keys{service=\"ops\",binding=\"ops\"} 1",
        "mend_held_messages{service=\"ops\",binding=\"ops\"} 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("mend_consumer_pending{"), "{metrics}");

    // NATS gone: not ready, still alive; back: ready again.
    w.nats.stop().await?;
    mend_e2e::wait::until("not ready", TEST_TIMEOUT, || async {
        let (status, body) = get(&format!("{base}/readyz")).await?;
        Ok((status == 503 && body.contains("NATS")).then_some(()))
    })
    .await?;
    assert_eq!(get(&format!("{base}/healthz")).await?.0, 200);
    w.nats.restart().await?;
    mend_e2e::wait::until("ready again", TEST_TIMEOUT, || async {
        Ok((get(&format!("{base}/readyz")).await?.0 == 200).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_mend_id_of_the_message() -> anyhow::Result<()> {
    let w = World::new().await?;
    w.app.script(|_| Reply::Status(422));
    let seqs = w.publish_keyed(1, 1).await?;
    let config = w.keyed_config("logs", "");
    let s = MendProcess::start_with_env("sidecar", &config, &[("MEND_LOG_FORMAT", "json")]).await?;
    s.wait_log("delegating", TEST_TIMEOUT).await?;
    let line = s
        .log()
        .lines()
        .find(|l| l.contains("delegating"))
        .unwrap()
        .to_owned();
    let json: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(
        json["span"]["mend_id"],
        format!("APP:{}", seqs[0]),
        "{line}"
    );
    assert_eq!(json["span"]["key"], "k0", "{line}");
    assert_eq!(json["level"], "INFO");
    Ok(())
}

/// With the app stream created through `admin`: a sidecar with the `good` `[nats]` table consumes,
/// and one with any of the `bad` tables refuses to start, saying it cannot connect.
async fn auth_case(
    nats: &NatsServer,
    admin: async_nats::Client,
    good: &str,
    bad: &[String],
) -> anyhow::Result<()> {
    mend_e2e::js::app_stream(&async_nats::jetstream::new(admin), "APP", &["app.>"]).await?;
    let base = sidecar_config(
        "auth",
        &nats.url(),
        "APP",
        &["app.>"],
        "http://127.0.0.1:1/",
        "",
    );
    for b in bad {
        let (code, log) = refused(&with_top_level(&base, b), &[]).await?;
        assert_eq!(code, Some(69), "{b}\n{log}");
        assert!(log.contains("cannot connect to NATS"), "{b}\n{log}");
    }
    let accepted = MendProcess::start("sidecar", &with_top_level(&base, good)).await?;
    accepted.ready().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_token_auth() -> anyhow::Result<()> {
    let nats = NatsServer::start_with(&["--auth", "s3cret"]).await?;
    let admin = async_nats::ConnectOptions::with_token("s3cret".into())
        .connect(nats.url())
        .await?;
    let bad = ["[nats]\ntoken = \"wrong\"".to_string(), String::new()];
    auth_case(&nats, admin, "[nats]\ntoken = \"s3cret\"", &bad).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_user_password_auth() -> anyhow::Result<()> {
    let nats = NatsServer::start_with(&["--user", "mend", "--pass", "pw"]).await?;
    let admin = async_nats::ConnectOptions::with_user_and_password("mend".into(), "pw".into())
        .connect(nats.url())
        .await?;
    let bad = ["[nats]\nuser = \"mend\"\npassword = \"nope\"".to_string()];
    auth_case(
        &nats,
        admin,
        "[nats]\nuser = \"mend\"\npassword = \"pw\"",
        &bad,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_tls_and_nkey_auth() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name).display().to_string();

    // A CA and a server certificate for 127.0.0.1 signed by it.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?
            .signed_by(&leaf_key, &ca)?;
    std::fs::write(path("ca.pem"), ca.pem())?;
    std::fs::write(path("server.pem"), leaf.pem())?;
    std::fs::write(path("server.key"), leaf_key.serialize_pem())?;

    // An NKey user.
    let user = nkeys::KeyPair::new_user();
    std::fs::write(path("user.nk"), user.seed()?)?;
    std::fs::write(
        path("server.conf"),
        format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    )?;

    let nats = NatsServer::start_with(&[
        "-c",
        &path("server.conf"),
        "--tls",
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server.key"),
    ])
    .await?;
    let admin = async_nats::ConnectOptions::with_nkey(user.seed()?)
        .add_root_certificates(path("ca.pem").into())
        .require_tls(true)
        .connect(nats.url())
        .await?;
    let (seed, ca) = (path("user.nk"), path("ca.pem"));
    let good = format!("[nats]\nnkey_seed_file = {seed:?}\ntls_ca = {ca:?}\ntls_required = true");
    // Without the CA the server is not trusted; without the NKey the user is not known.
    let bad = [
        format!("[nats]\nnkey_seed_file = {seed:?}\ntls_required = true"),
        format!("[nats]\ntls_ca = {ca:?}\ntls_required = true"),
    ];
    auth_case(&nats, admin, &good, &bad).await
}

/// A NATS JWT: claims `nats` (with its `type`) about `subject`, signed by `issuer`.
fn nats_jwt(
    issuer: &nkeys::KeyPair,
    subject: &str,
    name: &str,
    nats: serde_json::Value,
) -> anyhow::Result<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}-{now}"), "iat": now, "iss": issuer.public_key(), "name": name,
        "sub": subject, "nats": nats,
    });
    let body = b64.encode(serde_json::to_vec(&claims)?);
    let signature = issuer.sign(format!("{header}.{body}").as_bytes())?;
    Ok(format!("{header}.{body}.{}", b64.encode(signature)))
}

/// A `.creds` file: a user JWT and the seed that proves it.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_creds_file_auth() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = |name: &str| dir.path().join(name).display().to_string();
    // Operator mode: an operator signs an app account and a system account; the app account signs
    // the user whose JWT and seed go into the creds file.
    let operator = nkeys::KeyPair::new_operator();
    let (account, system, user) = (
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_account(),
        nkeys::KeyPair::new_user(),
    );
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
        "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_claims = |limits: serde_json::Value| serde_json::json!({"type": "account", "version": 2, "limits": limits});
    let op_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2, "system_account": system.public_key()}),
    )?;
    let acct_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "app",
        account_claims(limits),
    )?;
    let sys_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "sys",
        account_claims(serde_json::json!({"conn": -1})),
    )?;
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "mend",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    )?;
    std::fs::write(
        path("server.conf"),
        format!(
            "operator: {op_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {acct}: {acct_jwt}\n  {sys}: {sys_jwt}\n}}\n",
            sys = system.public_key(),
            acct = account.public_key(),
        ),
    )?;
    std::fs::write(path("mend.creds"), creds(&user_jwt, &user.seed()?))?;
    // The same JWT with a seed that does not match it.
    std::fs::write(
        path("stranger.creds"),
        creds(&user_jwt, &nkeys::KeyPair::new_user().seed()?),
    )?;

    let nats = NatsServer::start_with(&["-c", &path("server.conf")]).await?;
    let admin = async_nats::ConnectOptions::with_credentials_file(path("mend.creds"))
        .await?
        .connect(nats.url())
        .await?;
    let table = |file: &str| format!("[nats]\ncreds = {:?}", path(file));
    auth_case(
        &nats,
        admin,
        &table("mend.creds"),
        &[table("stranger.creds")],
    )
    .await
}
