//! `fake-example-crm [API_KEY]`: serves the fake Example CRM API (see
//! `ferry_test_support::fake_example`) on a free 127.0.0.1 port, prints its
//! base URL on stdout, and serves until stdin closes or the process is
//! killed. For recording the scaffold's session and for trying a
//! scaffolded connector by hand.

use std::io::{BufRead, Write};

use ferry_test_support::fake_example::FakeExampleCrm;

fn main() -> anyhow::Result<()> {
    let api_key = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sk_test_example".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let fake = runtime.block_on(FakeExampleCrm::start(&api_key))?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", fake.url())?;
    stdout.flush()?;
    for line in std::io::stdin().lock().lines() {
        line?;
    }
    drop(fake);
    Ok(())
}
