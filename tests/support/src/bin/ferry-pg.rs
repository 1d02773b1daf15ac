//! `ferry-pg`: starts a throw-away PostgreSQL cluster, prints the URL of a
//! fresh database on stdout, and keeps the cluster alive until stdin closes
//! or the process is killed (scripts use it, e.g. scripts/schemathesis.sh).

use std::io::{BufRead, Write};

use ferry_test_support::postgres::PgCluster;

fn main() -> anyhow::Result<()> {
    let cluster = PgCluster::start()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let url = runtime.block_on(cluster.create_database())?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{url}")?;
    stdout.flush()?;
    // Block until stdin reaches EOF; the cluster stops when we exit.
    for line in std::io::stdin().lock().lines() {
        line?;
    }
    drop(cluster);
    Ok(())
}
