//! The hidden `--completions SHELL` and `--man` flags every tool answers: shell completions
//! (clap_complete) and a man page (clap_mangen, with the `--help` examples as its EXAMPLES
//! section), generated from the tool's own clap parser. `scripts/gen-completions.sh` writes
//! them for all tools.

use clap::CommandFactory;
use clap_complete::Shell;
use std::io::Write;

/// What the command line asks for instead of a normal run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Meta {
    Completions(Shell),
    Man,
}

/// Find `--completions SHELL` (or `--completions=SHELL`) or `--man` in `argv` (program name
/// first); arguments after `--` are not looked at.
pub fn find(argv: &[String]) -> Result<Option<Meta>, String> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--man" {
            return Ok(Some(Meta::Man));
        }
        let shell = match a.strip_prefix("--completions") {
            Some("") => it.next().map(String::as_str).unwrap_or(""),
            Some(rest) => match rest.strip_prefix('=') {
                Some(v) => v,
                None => continue,
            },
            None => continue,
        };
        return shell
            .parse::<Shell>()
            .map(|s| Some(Meta::Completions(s)))
            .map_err(|_| {
                format!("--completions {shell:?}: expected bash, zsh, fish, elvish or powershell")
            });
    }
    Ok(None)
}

/// Print completions or the man page of `A`'s command and exit when `argv` asks for them;
/// return otherwise.
pub fn handle<A: CommandFactory>(argv: &[String]) {
    let meta = match find(argv) {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(msg) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    };
    let cmd = A::command();
    let mut out = Vec::new();
    match meta {
        Meta::Completions(shell) => completions(cmd, shell, &mut out),
        Meta::Man => {
            if let Err(e) = man_page(cmd, &mut out) {
                eprintln!("error: writing the man page: {e}");
                std::process::exit(70);
            }
        }
    }
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = stdout.write_all(&out).and_then(|()| stdout.flush());
    std::process::exit(0)
}

/// Shell completions of `cmd` for `shell`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// A man page (section 1) of `cmd`: clap_mangen's NAME, SYNOPSIS, DESCRIPTION and OPTIONS,
/// then the `--help` examples (after_help) as EXAMPLES, then VERSION.
pub fn man_page(cmd: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let examples = cmd
        .get_after_long_help()
        .or_else(|| cmd.get_after_help())
        .map(|s| s.to_string());
    let man = clap_mangen::Man::new(cmd.clone()).manual("peftkit");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if let Some(text) = examples {
        out.write_all(b".SH EXAMPLES\n.nf\n")?;
        for line in text.lines() {
            let line = line.replace('\\', "\\e");
            if line.starts_with('.') || line.starts_with('\'') {
                out.write_all(b"\\&")?;
            }
            writeln!(out, "{line}")?;
        }
        out.write_all(b".fi\n")?;
    }
    man.render_version_section(out)?;
    writeln!(
        out,
        ".SH SEE ALSO\ndocs/{}.md and docs/exit-codes.md in the peftkit repository",
        cmd.get_name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        std::iter::once("tool")
            .chain(s.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn finds_the_flags() {
        assert_eq!(find(&argv(&["--model", "m"])), Ok(None));
        assert_eq!(find(&argv(&["--man"])), Ok(Some(Meta::Man)));
        assert_eq!(
            find(&argv(&["--completions", "bash"])),
            Ok(Some(Meta::Completions(Shell::Bash)))
        );
        assert_eq!(
            find(&argv(&["--completions=zsh"])),
            Ok(Some(Meta::Completions(Shell::Zsh)))
        );
        assert!(find(&argv(&["--completions", "tcsh"])).is_err());
        assert!(find(&argv(&["--completions"])).is_err());
        assert_eq!(find(&argv(&["--", "--man"])), Ok(None));
        assert_eq!(find(&argv(&["--completionsx"])), Ok(None));
    }
}
