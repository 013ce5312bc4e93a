//! The throw-away PostgreSQL of the test harness: two servers side by side, each its own cluster on
//! its own port, reachable through sqlx's Any driver, and gone (port closed, files removed) as soon
//! as it is dropped.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mend_e2e::postgres::Postgres;
use mend_e2e::wait;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_are_separate_and_stop_on_drop() -> anyhow::Result<()> {
    sqlx::any::install_default_drivers();
    let started = Instant::now();
    let (a, b) = tokio::try_join!(Postgres::start(), Postgres::start())?;
    eprintln!("two servers started in {:?}", started.elapsed());
    assert_ne!(a.port(), b.port());
    assert_ne!(a.url(), b.url());

    let url_a = a.database("mend_a").await?;
    let url_b = b.database("mend-b").await?;
    let pool_a = sqlx::AnyPool::connect(&url_a).await?;
    let pool_b = sqlx::AnyPool::connect(&url_b).await?;

    let sum: i32 = sqlx::query_scalar("SELECT 40 + 2")
        .fetch_one(&pool_a)
        .await?;
    assert_eq!(sum, 42);
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&pool_b)
        .await?;
    assert_eq!(db, "mend-b");

    // Separate clusters: separate data directories, and a table made in one is not in the other.
    let dir_of = |pool: &sqlx::AnyPool| {
        let pool = pool.clone();
        async move {
            let dir: String = sqlx::query_scalar("SELECT current_setting('data_directory')")
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(PathBuf::from(dir))
        }
    };
    let (dir_a, dir_b) = (dir_of(&pool_a).await?, dir_of(&pool_b).await?);
    assert_ne!(dir_a, dir_b);
    assert!(dir_a.is_dir(), "{} should exist", dir_a.display());
    sqlx::query("CREATE TABLE only_in_a (n INT)")
        .execute(&pool_a)
        .await?;
    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = 'only_in_a'";
    let in_a: i64 = sqlx::query_scalar(tables).fetch_one(&pool_a).await?;
    let in_b: i64 = sqlx::query_scalar(tables).fetch_one(&pool_b).await?;
    assert_eq!((in_a, in_b), (1, 0));

    // Dropping a server stops it at once, even with a client still connected.
    let port_a = a.port();
    let dropping = Instant::now();
    drop(a);
    eprintln!("server dropped in {:?}", dropping.elapsed());
    wait::until(
        "the dropped server's port to refuse connections",
        Duration::from_secs(10),
        || async {
            let refused = tokio::net::TcpStream::connect(("127.0.0.1", port_a))
                .await
                .is_err();
            Ok(refused.then_some(()))
        },
    )
    .await?;
    assert!(!dir_a.exists(), "{} should be removed", dir_a.display());
    drop(pool_a);

    // The other one is untouched.
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool_b).await?;
    assert_eq!(one, 1);
    pool_b.close().await;
    Ok(())
}
