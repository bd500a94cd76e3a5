//! Pushes Alcove's test images to a registry: `push-test-images HOST:PORT [USER PASSWORD]`.
//! Without credentials it pushes `alcove-test/busybox-httpd:1`; with them, `alcove-test/private:1`
//! (for a registry that wants them). Used by `tests/registry/start.sh`.

#[path = "../tests/common/registry.rs"]
mod registry;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, creds) = match args.as_slice() {
        [addr] => (addr.clone(), None),
        [addr, user, pass] => (addr.clone(), Some((user.clone(), pass.clone()))),
        _ => {
            eprintln!("usage: push-test-images HOST:PORT [USER PASSWORD]");
            std::process::exit(2);
        }
    };
    let creds = creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    registry::push_test_images(&addr, creds).await;
}
