//! `sqlx::migrate!` embeds `../migrations` when the crate compiles; without
//! this, a migration added on its own would not rebuild the crate, and a
//! cached build would start without it.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
