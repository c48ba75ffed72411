//! The `kvs-emulator` program, as a user runs it: a child process on a free port, talked to by
//! the AWS Rust SDK, the HLS URL it prints, and, where installed, the AWS CLI and boto3.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aws_sdk_kinesisvideo::types::ApiName;

/// The running program, killed on drop.
struct Program {
    child: Child,
    endpoint: String,
    data_endpoint: String,
    session_urls: Vec<String>,
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kvs-emulator --port 0 args…` and reads what it prints until "Ctrl+C stops".
fn start(args: &[&str]) -> Program {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvs-emulator"))
        .args(["--port", "0"])
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kvs-emulator starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let done = line.starts_with("Ctrl+C stops");
                lines.push(line);
                if done {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("kvs-emulator did not come up ({e:?}); it printed {lines:#?}");
            }
        }
    }
    let first = &lines[0];
    // "KVS emulator listening on http://127.0.0.1:P (data endpoint http://127.0.0.1:Q)"
    let endpoint = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("an endpoint in the first line")
        .to_owned();
    let data_endpoint = first
        .rsplit_once("data endpoint ")
        .map(|(_, rest)| rest.trim_end_matches(')').to_owned())
        .expect("the data endpoint in the first line");
    let session_urls = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("http://"))
        .map(str::to_owned)
        .collect();
    Program {
        child,
        endpoint,
        data_endpoint,
        session_urls,
    }
}

/// A plain HTTP/1.1 GET: (status, body).
fn get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&response[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let mut body = response[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16)
            .expect("a chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("eu-west-1"))
        .endpoint_url(endpoint)
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new("AKIDANYTHING", "any", None, None, "test"),
            ),
        )
        .build()
}

#[tokio::test]
async fn the_program_serves_the_sdk_and_the_hls_url_it_prints() {
    let program = start(&[
        "--stream",
        "cam-a:320x240@15",
        "--stream",
        "cam-b",
        "--fragment-duration",
        "1",
        "--region",
        "eu-west-1",
    ]);
    assert_ne!(program.endpoint, program.data_endpoint);

    let control = aws_sdk_kinesisvideo::Client::new(&sdk_config(&program.endpoint));
    let listed = control.list_streams().send().await.expect("ListStreams");
    let mut names: Vec<_> = listed
        .stream_info_list()
        .iter()
        .filter_map(|s| s.stream_name())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["cam-a", "cam-b"]);
    let described = control
        .describe_stream()
        .stream_name("cam-a")
        .send()
        .await
        .expect("DescribeStream");
    let arn = described
        .stream_info()
        .and_then(|s| s.stream_arn())
        .unwrap_or_default();
    assert!(arn.starts_with("arn:aws:kinesisvideo:eu-west-1:"), "{arn}");
    let endpoint = control
        .get_data_endpoint()
        .stream_name("cam-a")
        .api_name(ApiName::GetHlsStreamingSessionUrl)
        .send()
        .await
        .expect("GetDataEndpoint");
    assert_eq!(
        endpoint.data_endpoint(),
        Some(program.data_endpoint.as_str())
    );

    // One LIVE session URL per stream, on the data endpoint; its master playlist names a media
    // playlist, whose fragments are fMP4 (moof first).
    assert_eq!(program.session_urls.len(), 2, "{:?}", program.session_urls);
    let url = &program.session_urls[0];
    assert!(url.starts_with(&program.data_endpoint), "{url}");
    let (status, master) = get(url);
    assert_eq!(status, 200);
    let master = String::from_utf8(master).unwrap();
    let media = master
        .lines()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .expect("a media playlist in the master playlist");
    let base = url.rsplit_once('/').unwrap().0;
    let (status, playlist) = get(&format!("{base}/{media}"));
    assert_eq!(status, 200);
    let playlist = String::from_utf8(playlist).unwrap();
    assert!(playlist.contains("#EXT-X-PROGRAM-DATE-TIME"), "{playlist}");
    let fragment = playlist
        .lines()
        .rfind(|l| !l.starts_with('#') && !l.is_empty())
        .expect("a fragment");
    let (status, bytes) = get(&format!("{base}/{fragment}"));
    assert_eq!(status, 200);
    assert_eq!(&bytes[4..8], b"moof");
}

/// The AWS CLI and boto3 against the program, where they are installed (neither is part of a
/// fresh machine's setup: each case says when it is skipped).
#[test]
fn the_aws_cli_and_boto3_talk_to_the_program() {
    // Without --no-session-url the program prints its "Ctrl+C" line only once the stream has a
    // fragment, so the session URL below exists.
    let program = start(&["--stream", "cli-cam:160x120@10", "--fragment-duration", "1"]);
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDKVSFRAMESEMULATOR"),
        ("AWS_SECRET_ACCESS_KEY", "x"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    match Command::new("aws")
        .args([
            "--endpoint-url",
            &program.endpoint,
            "kinesisvideo",
            "list-streams",
        ])
        .envs(env)
        .output()
    {
        Err(_) => eprintln!("no aws CLI here: the CLI case is skipped"),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "aws failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("\"StreamName\": \"cli-cam\""), "{text}");
        }
    }
    let script = r#"
import sys, boto3
kv = boto3.client("kinesisvideo", endpoint_url=sys.argv[1])
ep = kv.get_data_endpoint(StreamName="cli-cam", APIName="GET_HLS_STREAMING_SESSION_URL")["DataEndpoint"]
am = boto3.client("kinesis-video-archived-media", endpoint_url=ep)
url = am.get_hls_streaming_session_url(StreamName="cli-cam", PlaybackMode="LIVE")["HLSStreamingSessionURL"]
print(ep)
print(url)
"#;
    let has_boto3 = Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_boto3 {
        eprintln!("no python3 with boto3 here: the boto3 case is skipped");
        return;
    }
    let out = Command::new("python3")
        .args(["-c", script, &program.endpoint])
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(program.data_endpoint.as_str()));
    let url = lines.next().unwrap_or_default();
    assert!(url.starts_with(&program.data_endpoint), "{url}");
    assert_eq!(get(url).0, 200);
}
