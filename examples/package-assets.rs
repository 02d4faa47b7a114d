//! package-assets: the man page and shell completions of the Debian package,
//! generated from the clap definition of the command line
//! (`splice_relay::cli::Args`), never written by hand.
//!
//! ```text
//! cargo run --example package-assets -- OUTDIR
//! ```
//!
//! writes into OUTDIR (created if missing):
//! - `splice-relay.1`: the man page (roff; scripts/build-deb.sh gzips it),
//! - `splice-relay.bash`, `_splice-relay` (zsh), `splice-relay.fish`.
//!
//! clap_mangen and clap_complete are dev-dependencies: the relay's own
//! binary never links them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use splice_relay::cli::Args;

/// The name the binary is installed under, and that the man page and the
/// completions describe.
const BIN_NAME: &str = "splice-relay";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example package-assets -- OUTDIR");
        return ExitCode::from(2);
    };
    match write_assets(Path::new(&out)) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("package-assets: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the man page and the completions into `out`; returns their paths.
fn write_assets(out: &Path) -> Result<Vec<PathBuf>, String> {
    let cmd = Args::command();
    if cmd.get_name() != BIN_NAME {
        return Err(format!("the clap command is named {:?}, not {BIN_NAME:?}", cmd.get_name()));
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut written = Vec::new();

    let man = out.join(format!("{BIN_NAME}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("1")
        .source(format!("{BIN_NAME} {}", env!("CARGO_PKG_VERSION")))
        .manual("User Commands")
        .render(&mut page)
        .map_err(|e| format!("rendering the man page: {e}"))?;
    std::fs::write(&man, page).map_err(|e| format!("{}: {e}", man.display()))?;
    written.push(man);

    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd.clone(), BIN_NAME, out)
            .map_err(|e| format!("{shell} completions in {}: {e}", out.display()))?;
        written.push(path);
    }
    Ok(written)
}
