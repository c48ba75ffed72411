//! HLS as KVS serves it: playlist parsing and the fMP4 boxes the reader rewrites.

pub(crate) mod fmp4;
pub(crate) mod ts;

use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Result};

/// The longest `#EXTINF` / `#EXT-X-TARGETDURATION` accepted (KVS fragments last 1-20 s).
const MAX_SEGMENT_DURATION: Duration = Duration::from_secs(24 * 3600);

/// One media segment (a KVS fragment) of a media playlist, with absolute URLs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Segment {
    /// Media sequence number (session-local).
    pub sequence: u64,
    pub url: String,
    pub duration: Duration,
    /// `EXT-X-PROGRAM-DATE-TIME`, when present.
    pub program_date_time: Option<SystemTime>,
    pub discontinuity: bool,
    /// The `EXT-X-MAP` in effect for this segment.
    pub map_url: Option<String>,
}

/// A parsed media playlist.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MediaPlaylist {
    pub target_duration: Duration,
    pub end_list: bool,
    pub segments: Vec<Segment>,
}

fn join(base: &url::Url, relative: &str) -> Result<String> {
    base.join(relative).map(String::from).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("playlist URI {relative:?} cannot be resolved: {e}"),
        )
    })
}

fn base_url(url: &str) -> Result<url::Url> {
    url::Url::parse(url).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            format!("invalid playlist URL {url:?}: {e}"),
        )
    })
}

/// The media playlist URL of a master playlist (its first variant), or `url` itself when the
/// text is already a media playlist.
pub(crate) fn media_playlist_url(url: &str, text: &[u8]) -> Result<String> {
    let base = base_url(url)?;
    match m3u8_rs::parse_playlist_res(text) {
        Ok(m3u8_rs::Playlist::MasterPlaylist(master)) => {
            let variant = master.variants.first().ok_or_else(|| {
                Error::new(ErrorKind::Protocol, "the master playlist has no variant")
            })?;
            join(&base, &variant.uri)
        }
        Ok(m3u8_rs::Playlist::MediaPlaylist(_)) => Ok(url.to_owned()),
        Err(e) => Err(unparsable("master", text, &e)),
    }
}

/// The error for a playlist the parser refused. It never shows the body: the parser's own
/// message prints the unparsed rest (session-token URLs included) as bytes, which redaction
/// cannot recognise. It says where parsing stopped, and how the body starts when that is not
/// a playlist at all (an HTML error page, say), with any URL query removed.
fn unparsable(which: &str, text: &[u8], err: &nom::Err<nom::error::Error<&[u8]>>) -> Error {
    let at = match err {
        nom::Err::Error(e) | nom::Err::Failure(e) => {
            format!(" at byte {}", text.len().saturating_sub(e.input.len()))
        }
        nom::Err::Incomplete(_) => " (incomplete)".to_owned(),
    };
    let start = if text.starts_with(b"#EXTM3U") {
        String::new()
    } else {
        let head: String = String::from_utf8_lossy(&text[..text.len().min(24)])
            .chars()
            .take_while(|c| *c != '?' && !c.is_control())
            .collect();
        format!("; it does not start with #EXTM3U but {head:?}")
    };
    Error::new(
        ErrorKind::Protocol,
        format!(
            "cannot parse the {which} playlist ({} bytes){at}{start}",
            text.len()
        ),
    )
}

/// Parses a media playlist, resolving every URI against `url`.
pub(crate) fn parse_media_playlist(url: &str, text: &[u8]) -> Result<MediaPlaylist> {
    let base = base_url(url)?;
    let playlist = match m3u8_rs::parse_playlist_res(text) {
        Ok(m3u8_rs::Playlist::MediaPlaylist(p)) => p,
        Ok(m3u8_rs::Playlist::MasterPlaylist(_)) => {
            return Err(Error::new(
                ErrorKind::Protocol,
                "expected a media playlist, got a master playlist",
            ));
        }
        Err(e) => return Err(unparsable("media", text, &e)),
    };
    let mut map_url = None;
    let mut segments = Vec::with_capacity(playlist.segments.len());
    for (i, s) in playlist.segments.iter().enumerate() {
        if let Some(map) = &s.map {
            map_url = Some(join(&base, &map.uri)?);
        }
        // KVS fragments last 1-20 s; anything past a day is not a duration.
        let duration = Duration::try_from_secs_f64(f64::from(s.duration))
            .ok()
            .filter(|d| *d <= MAX_SEGMENT_DURATION)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("segment {i} has an invalid duration {}", s.duration),
                )
            })?;
        let sequence = u64::try_from(i)
            .ok()
            .and_then(|i| playlist.media_sequence.checked_add(i))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("media sequence {} + {i} overflows", playlist.media_sequence),
                )
            })?;
        segments.push(Segment {
            sequence,
            url: join(&base, &s.uri)?,
            duration,
            program_date_time: s.program_date_time.map(SystemTime::from),
            discontinuity: s.discontinuity,
            map_url: map_url.clone(),
        });
    }
    if Duration::from_secs(playlist.target_duration) > MAX_SEGMENT_DURATION {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!(
                "the playlist has an invalid target duration {}",
                playlist.target_duration
            ),
        ));
    }
    Ok(MediaPlaylist {
        target_duration: Duration::from_secs(playlist.target_duration),
        end_list: playlist.end_list,
        segments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEDIA: &str = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:4\n\
#EXT-X-INDEPENDENT-SEGMENTS\n#EXT-X-DISCONTINUITY\n\
#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?SessionToken=CiA%2Bx~&TrackNumber=1\"\n\
#EXT-X-PROGRAM-DATE-TIME:2022-01-28T07:00:35.931Z\n#EXTINF:1.01,\n\
getMP4MediaFragment.mp4?FragmentNumber=4&SessionToken=CiA%2Bx~&TrackNumber=1\n\
#EXT-X-PROGRAM-DATE-TIME:2022-01-28T07:00:36.941Z\n#EXTINF:0.998,\n\
getMP4MediaFragment.mp4?FragmentNumber=5&SessionToken=CiA%2Bx~&TrackNumber=1\n";

    #[test]
    fn parses_kvs_media_playlists() {
        let url = "https://b-1.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getHLSMediaPlaylist.m3u8?SessionToken=CiA%2Bx~&TrackNumber=1";
        let p = parse_media_playlist(url, MEDIA.as_bytes()).unwrap();
        assert_eq!(p.target_duration, Duration::from_secs(2));
        assert!(!p.end_list);
        assert_eq!(p.segments.len(), 2);
        assert_eq!(p.segments[0].sequence, 4);
        assert_eq!(p.segments[1].sequence, 5);
        assert!(p.segments[0].discontinuity && !p.segments[1].discontinuity);
        assert_eq!(
            p.segments[0].url,
            "https://b-1.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getMP4MediaFragment.mp4?FragmentNumber=4&SessionToken=CiA%2Bx~&TrackNumber=1"
        );
        // The map carries forward.
        assert_eq!(p.segments[0].map_url, p.segments[1].map_url);
        assert!(
            p.segments[1]
                .map_url
                .as_deref()
                .unwrap()
                .contains("getMP4InitFragment.mp4")
        );
        let t0 = p.segments[0].program_date_time.unwrap();
        let t1 = p.segments[1].program_date_time.unwrap();
        assert_eq!(t1.duration_since(t0).unwrap(), Duration::from_millis(1010));
        assert_eq!(
            p.segments[1].duration,
            Duration::from_secs_f64(0.998f32 as f64)
        );
    }

    #[test]
    fn master_gives_the_media_playlist() {
        let master = "#EXTM3U\n#EXT-X-VERSION:1\n#EXT-X-STREAM-INF:CODECS=\"avc1.4d4029\",RESOLUTION=1280x720,FRAME-RATE=15.0,BANDWIDTH=1953544\ngetHLSMediaPlaylist.m3u8?SessionToken=abc~&TrackNumber=1\n";
        let url = "http://127.0.0.1:1/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=abc~";
        assert_eq!(
            media_playlist_url(url, master.as_bytes()).unwrap(),
            "http://127.0.0.1:1/hls/v1/getHLSMediaPlaylist.m3u8?SessionToken=abc~&TrackNumber=1"
        );
        let err = parse_media_playlist(url, master.as_bytes()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        let err = parse_media_playlist(url, b"<html>").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
    }

    #[test]
    fn parse_errors_never_show_the_body() {
        // A playlist cut in the middle of a tag: the parser's own error would print the rest,
        // token URLs included, as bytes.
        let token = "CiA%2Bx~";
        let url = "http://127.0.0.1:1/hls/v1/getHLSMediaPlaylist.m3u8?SessionToken=CiA%2Bx~";
        let body = MEDIA.replace("#EXTINF:1.01,", "#EXTINF:abc,");
        for text in [
            body.as_bytes(),
            b"<html>getMP4MediaFragment.mp4?SessionToken=CiA%2Bx~",
            b"",
        ] {
            let Err(err) = parse_media_playlist(url, text) else {
                continue;
            };
            let shown = format!("{err} {err:?}");
            assert!(
                !shown.contains(token) && !shown.contains("SessionToken"),
                "{shown}"
            );
        }
        let err = parse_media_playlist(url, b"<html>oops?SessionToken=CiA").unwrap_err();
        assert!(err.to_string().contains("\"<html>oops\""), "{err}");
        let err = media_playlist_url(url, b"garbage?SessionToken=x").unwrap_err();
        assert!(!err.to_string().contains("SessionToken"), "{err}");
    }

    #[test]
    fn absurd_values_are_errors_not_panics() {
        let url = "http://127.0.0.1:1/m.m3u8";
        // Past Duration::MAX (from_secs_f64 panics there), past f32 (infinite), past a day.
        for extinf in ["100000000000000000000000", "9".repeat(60).as_str(), "90000"] {
            let huge = MEDIA.replace("#EXTINF:1.01,", &format!("#EXTINF:{extinf},"));
            let err = parse_media_playlist(url, huge.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Protocol);
            assert!(err.to_string().contains("invalid duration"), "{err}");
        }
        let wrap = MEDIA.replace(
            "#EXT-X-MEDIA-SEQUENCE:4",
            "#EXT-X-MEDIA-SEQUENCE:18446744073709551615",
        );
        let err = parse_media_playlist(url, wrap.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
        let target = MEDIA.replace(
            "#EXT-X-TARGETDURATION:2",
            "#EXT-X-TARGETDURATION:18446744073709551615",
        );
        assert!(parse_media_playlist(url, target.as_bytes()).is_err());
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes: an error or a playlist, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let url = "http://127.0.0.1:1/m.m3u8";
            let _ = parse_media_playlist(url, &data);
            let _ = media_playlist_url(url, &data);
        }

        /// A KVS playlist with lines dropped, repeated or changed, and digits replaced by any
        /// number: never a panic, and errors never show the session token.
        #[test]
        fn mutated_playlists_never_panic_or_leak(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<u64>(), any::<f32>()), 1..8),
        ) {
            let url = "http://127.0.0.1:1/hls/v1/getHLSMediaPlaylist.m3u8?SessionToken=CiA%2Bx~";
            let mut lines: Vec<String> = MEDIA.lines().map(str::to_owned).collect();
            for (at, op, n, f) in edits {
                if lines.is_empty() {
                    break;
                }
                let i = at.index(lines.len());
                match op {
                    0 => { lines.remove(i); }
                    1 => { let l = lines[i].clone(); lines.insert(i, l); }
                    2 => {
                        let l = &lines[i];
                        let cut = l.find(|c: char| c.is_ascii_digit()).unwrap_or(l.len());
                        lines[i] = format!("{}{n}", &l[..cut]);
                    }
                    _ => {
                        let l = &lines[i];
                        let cut = l.find(':').map_or(l.len(), |c| c + 1);
                        lines[i] = format!("{}{f},", &l[..cut]);
                    }
                }
            }
            let text = lines.join("\n");
            let errors = [
                parse_media_playlist(url, text.as_bytes()).err(),
                media_playlist_url(url, text.as_bytes()).err(),
            ];
            for err in errors.into_iter().flatten() {
                let shown = format!("{err} {err:?}");
                prop_assert!(!shown.contains("CiA"), "{}", shown);
            }
        }
    }
}
