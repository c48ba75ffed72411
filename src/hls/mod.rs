//! HLS as KVS serves it: playlist parsing and the fMP4 boxes the reader rewrites.

pub(crate) mod fmp4;

use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind, Result};

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
        Err(e) => Err(Error::new(
            ErrorKind::Protocol,
            format!("cannot parse the master playlist: {e}"),
        )),
    }
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
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("cannot parse the media playlist: {e}"),
            ));
        }
    };
    let mut map_url = None;
    let mut segments = Vec::with_capacity(playlist.segments.len());
    for (i, s) in playlist.segments.iter().enumerate() {
        if let Some(map) = &s.map {
            map_url = Some(join(&base, &map.uri)?);
        }
        let duration = if s.duration.is_finite() && s.duration >= 0.0 {
            Duration::from_secs_f64(f64::from(s.duration))
        } else {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("segment {i} has an invalid duration {}", s.duration),
            ));
        };
        segments.push(Segment {
            sequence: playlist.media_sequence + i as u64,
            url: join(&base, &s.uri)?,
            duration,
            program_date_time: s.program_date_time.map(SystemTime::from),
            discontinuity: s.discontinuity,
            map_url: map_url.clone(),
        });
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
}
