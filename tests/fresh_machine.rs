//! What a fresh machine needs, kept true by tests:
//!
//! * every GStreamer element named anywhere in the code is in an element table: the library's
//!   (its `src`, examples, tests, benches) in `kvs_frames::elements`, the emulator's (`emulator/`)
//!   in `kvs_emulator::elements`, so a new element cannot be added without the package that
//!   provides it;
//! * every package of those tables is installed by `make deps`, and is the package that really
//!   ships the element's plugin file here (`dpkg -S`);
//! * the examples colour their log lines only on a terminal, and never with `NO_COLOR`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gstreamer as gst;
use gstreamer::prelude::*;
use kvs_frames::elements::{ELEMENTS, EXTERNAL_ELEMENTS, ElementPackage, package_of};

/// The library's folders, scanned against its table.
const LIBRARY_DIRS: &[&str] = &["src", "examples", "tests", "benches"];
/// The emulator crate's folders, scanned against its own table.
const EMULATOR_DIRS: &[&str] = &["emulator/src", "emulator/tests", "emulator/benches"];

/// Both tables, as (element, package).
fn all_tables() -> Vec<(&'static str, &'static str)> {
    ELEMENTS
        .iter()
        .map(|p: &ElementPackage| (p.element, p.package))
        .chain(
            kvs_emulator::elements::ELEMENTS
                .iter()
                .map(|p| (p.element, p.package)),
        )
        .collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literals of a Rust file (plain, byte and raw), with `\`-newline continuations
/// joined; comments, char literals and lifetimes are skipped.
fn string_literals(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'\'' => {
                // 'x', '\n', '\'' are chars; 'a (no closing quote two on) is a lifetime.
                if b.get(i + 1) == Some(&b'\\') {
                    i += 3;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    // A multi-byte char literal ends within 5 bytes; otherwise a lifetime.
                    let end = (i + 2..(i + 6).min(b.len())).find(|&j| b[j] == b'\'');
                    i = match end {
                        Some(j) if !text[i + 1..j].contains(|c: char| c.is_ascii()) => j + 1,
                        _ => i + 1,
                    };
                }
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let body_start = open + 1;
                let end = text[body_start..]
                    .find(&close)
                    .map_or(b.len(), |e| body_start + e);
                out.push(text[body_start..end].to_owned());
                i = end + close.len();
            }
            b'"' => {
                let start = i + 1;
                i = start;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                let body = &text[start..i.min(b.len())];
                let continuation = regex_lite::Regex::new(r"\\\n\s*").unwrap();
                out.push(continuation.replace_all(body, "").into_owned());
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// Element names in a `gst-launch`-style description: the first word of each `!` segment.
fn pipeline_elements(description: &str) -> Vec<String> {
    if !description.contains('!') {
        return Vec::new();
    }
    let word = regex_lite::Regex::new(r"^[a-z][a-z0-9_]*$").unwrap();
    description
        .split('!')
        .filter_map(|segment| segment.split_whitespace().next())
        .filter(|first| word.is_match(first))
        .map(str::to_owned)
        .collect()
}

/// Lone words of the code that GStreamer also knows as elements, used for something else (a
/// test producer's mode, an error context).
const NOT_ELEMENTS: &[&str] = &["burn", "pipeline"];

/// Every element name the code in `dirs` uses, with the first file that names it.
fn elements_in_code(dirs: &[&str]) -> BTreeMap<String, String> {
    gst::init().unwrap();
    let mut files = Vec::new();
    for dir in dirs {
        rust_files(&root().join(dir), &mut files);
    }
    let mut found = BTreeMap::new();
    // This file names elements only to test the scanner.
    files.retain(|f| !f.ends_with("tests/fresh_machine.rs"));
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        for literal in string_literals(&text) {
            // Words of launch descriptions, and lone words (arguments of make, lists),
            // that GStreamer knows as elements here or that run in other programs (kvssink).
            // (A word no plugin here provides is found by the make() scan below, or fails its
            // own test: the table gets its package once it is installed.)
            let mut names = pipeline_elements(&literal);
            let word = literal.trim();
            if word.len() > 2 && !NOT_ELEMENTS.contains(&word) {
                names.push(word.to_owned());
            }
            for name in names {
                if gst::ElementFactory::find(&name).is_some()
                    || EXTERNAL_ELEMENTS.contains(&name.as_str())
                {
                    found.entry(name).or_insert_with(|| rel.clone());
                }
            }
        }
        // ElementFactory::make(NAME) of an element this machine may not have.
        let make = regex_lite::Regex::new(r#"ElementFactory::make\(\s*"([a-z0-9_]+)""#).unwrap();
        for c in make.captures_iter(&text) {
            found.entry(c[1].to_owned()).or_insert_with(|| rel.clone());
        }
    }
    found
}

#[test]
fn the_scanner_sees_the_code_it_must() {
    let found = elements_in_code(LIBRARY_DIRS);
    // One from each way of naming an element: a launch description, make(), a list.
    for name in ["x264enc", "mp4mux", "avdec_h264", "kvssink"] {
        assert!(found.contains_key(name), "{name} not found: {found:?}");
    }
    let found = elements_in_code(EMULATOR_DIRS);
    for name in ["textoverlay", "x264enc", "h264parse", "qtdemux"] {
        assert!(found.contains_key(name), "{name} not found: {found:?}");
    }
    assert_eq!(
        pipeline_elements("appsrc name=src ! video/x-raw,width=1 ! h264parse ! t. ! queue"),
        ["appsrc", "h264parse", "queue"]
    );
    let code = r##"let c = '"'; // "not ! this"
        f::<'a>("one ! two", b"x", r#"raw ! "q" ! three"#, '\'', "a\"b ! four", "x\
            ! five")"##;
    assert_eq!(
        string_literals(code),
        [
            "one ! two",
            "x",
            r#"raw ! "q" ! three"#,
            r#"a\"b ! four"#,
            "x! five"
        ]
    );
}

#[test]
fn every_element_in_the_code_has_its_package() {
    let missing: Vec<_> = elements_in_code(LIBRARY_DIRS)
        .into_iter()
        .filter(|(name, _)| {
            package_of(name).is_none() && !EXTERNAL_ELEMENTS.contains(&name.as_str())
        })
        .map(|(name, file)| format!("{name} (in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "elements without a package in src/elements.rs ELEMENTS: {missing:?}"
    );
    let missing: Vec<_> = elements_in_code(EMULATOR_DIRS)
        .into_iter()
        .filter(|(name, _)| kvs_emulator::elements::package_of(name).is_none())
        .map(|(name, file)| format!("{name} (in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "elements without a package in emulator/src/elements.rs ELEMENTS: {missing:?}"
    );
}

/// The packages `make deps` installs, read from the Makefile.
fn make_deps_packages() -> BTreeSet<String> {
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let joined = makefile.replace("\\\n", " ");
    let mut packages = BTreeSet::new();
    for line in joined.lines() {
        let Some((name, value)) = line.split_once(":=") else {
            continue;
        };
        if name.trim().ends_with("_PACKAGES") {
            packages.extend(
                value
                    .split_whitespace()
                    .filter(|w| !w.starts_with("$("))
                    .map(str::to_owned),
            );
        }
    }
    packages
}

#[test]
fn make_deps_installs_every_package_of_the_table() {
    let deps = make_deps_packages();
    assert!(
        deps.contains("gstreamer1.0-libav"),
        "Makefile not parsed: {deps:?}"
    );
    let absent: BTreeSet<_> = all_tables()
        .into_iter()
        .map(|(_, package)| package)
        .filter(|p| !deps.contains(*p))
        .collect();
    assert!(
        absent.is_empty(),
        "packages missing from make deps: {absent:?}"
    );
}

/// The Debian package that owns `path` (tried with and without the /usr merge).
fn owner(path: &str) -> Option<String> {
    let candidates = [
        path.to_owned(),
        format!("/usr{path}"),
        path.strip_prefix("/usr").unwrap_or(path).to_owned(),
    ];
    candidates.iter().find_map(|p| {
        let out = Command::new("dpkg-query").args(["-S", p]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next()?;
        out.status
            .success()
            .then(|| line.split(':').next().unwrap_or_default().to_owned())
    })
}

#[test]
fn every_element_of_the_table_is_here_from_its_package() {
    gst::init().unwrap();
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("no dpkg-query: package ownership not checked on this system");
        return;
    }
    let mut wrong = Vec::new();
    for (element, package) in all_tables() {
        let Some(factory) = gst::ElementFactory::find(element) else {
            wrong.push(kvs_frames::elements::missing(element).to_string());
            continue;
        };
        let plugin = factory.plugin().expect("an element has a plugin");
        let Some(file) = plugin.filename() else {
            continue; // built in (static), nothing to install
        };
        let file = file.display().to_string();
        match owner(&file) {
            Some(owner) if owner == package => {}
            other => wrong.push(format!(
                "{element}: the table says {package}, {file} belongs to {other:?}"
            )),
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// The example binary `name` next to this test's binary (built by `cargo test`/`nextest run`
/// with `--examples`).
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.parent()?.join("examples").join(name);
    path.exists().then_some(path)
}

/// Runs `command` (a program that logs at INFO once it is up) until its first INFO line, then
/// kills it; returns what it wrote to stdout.
fn first_log_bytes(mut command: Command) -> Vec<u8> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline && !bytes.windows(4).any(|w| w == b"INFO") {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    bytes
}

#[test]
fn examples_colour_only_terminals_and_honour_no_color() {
    let Some(emulator) = example("kvs_emulator") else {
        eprintln!("examples not built (run with --examples): skipped");
        return;
    };
    let args = ["--port", "0", "--stream", "colour-check:160x120@10"];
    let has_escape = |bytes: &[u8]| bytes.contains(&0x1b);

    // A pipe: no colours.
    let mut piped = Command::new(&emulator);
    piped.args(args).env_remove("NO_COLOR");
    let bytes = first_log_bytes(piped);
    assert!(
        bytes.windows(4).any(|w| w == b"INFO"),
        "no log line: {}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(!has_escape(&bytes), "colour codes into a pipe");

    // A terminal (script(1) gives the program a pseudo-terminal): colours, unless NO_COLOR.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("no script(1): the terminal case is not checked");
        return;
    }
    let line = format!("{} {}", emulator.display(), args.join(" "));
    let mut tty = Command::new("script");
    tty.args(["-qfec", &line, "/dev/null"])
        .env_remove("NO_COLOR");
    assert!(
        has_escape(&first_log_bytes(tty)),
        "no colours on a terminal"
    );
    let mut no_color = Command::new("script");
    no_color
        .args(["-qfec", &line, "/dev/null"])
        .env("NO_COLOR", "1");
    let bytes = first_log_bytes(no_color);
    assert!(bytes.windows(4).any(|w| w == b"INFO"));
    assert!(!has_escape(&bytes), "colours despite NO_COLOR");
}
