//! Writes a busybox bundle to the directory given, running the remaining
//! arguments (default `/bin/true`), with the benchmark's default limits.
fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: mkbundle DIR [ARGS...]");
    let rest: Vec<String> = args.collect();
    let mut b = gantry_tests::bundle::BundleBuilder::new().default_limits();
    if !rest.is_empty() {
        b = b.args(rest);
    }
    b.build(std::path::Path::new(&dir))?;
    Ok(())
}
