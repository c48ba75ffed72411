//! The emulator's state: streams, their fragments, sessions, faults and statistics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;

use super::StreamSpec;
use super::camera::{Camera, CameraConfig, CameraEvent, EncodedFragment, LiveSample};
use super::faults::FaultState;
use super::media::{LiveFragment, LiveFrame, LiveHeader};
use super::mp4::{self, Sample, VideoTrack};
use super::session::Session;
use crate::error::{Error, ErrorKind, Result};

/// A stream's status, as `DescribeStream` and `ListStreams` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamStatus {
    /// Being created: listed, but not yet usable.
    Creating,
    /// Usable.
    Active,
    /// Being updated.
    Updating,
    /// Being deleted.
    Deleting,
}

impl StreamStatus {
    /// The KVS spelling (`ACTIVE`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StreamStatus::Creating => "CREATING",
            StreamStatus::Active => "ACTIVE",
            StreamStatus::Updating => "UPDATING",
            StreamStatus::Deleting => "DELETING",
        }
    }
}

/// Ground truth about one published fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentRecord {
    /// Position in the stream, 0, 1, 2, … (continuous unless the camera was offline).
    pub index: u64,
    /// The KVS-style fragment number (a long decimal string, as `ListFragments` would show).
    pub fragment_number: String,
    /// Producer timestamp of the first frame.
    pub producer_start: SystemTime,
    /// Server timestamp (producer timestamp + ingest delay).
    pub server_start: SystemTime,
    /// Duration (frame count / fps).
    pub duration: Duration,
    /// Number of frames.
    pub frame_count: u32,
    /// Frame number (as in the picture's barcode) of the first frame.
    pub first_frame: u64,
    /// Picture width.
    pub width: u32,
    /// Picture height.
    pub height: u32,
    /// Size of the fMP4 media fragment in bytes.
    pub size: usize,
}

/// Counts of requests served, by kind, and of errors returned, by error code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestStats {
    /// Control-plane and archived-media API calls, by operation name (`ListStreams`, …).
    pub api_calls: BTreeMap<String, u64>,
    /// `getHLSMasterPlaylist.m3u8` requests.
    pub master_playlists: u64,
    /// `getHLSMediaPlaylist.m3u8` requests.
    pub media_playlists: u64,
    /// `getMP4InitFragment.mp4` requests.
    pub init_fragments: u64,
    /// `getMP4MediaFragment.mp4` requests.
    pub media_fragments: u64,
    /// Error responses by `x-amzn-ErrorType`.
    pub errors: BTreeMap<String, u64>,
    /// HLS sessions closed because a sixth active session of their stream was created.
    pub sessions_closed: u64,
}

/// A fragment as stored and served.
#[derive(Debug)]
pub(crate) struct StoredFragment {
    pub index: u64,
    pub producer_start: SystemTime,
    pub server_start: SystemTime,
    pub duration: Duration,
    pub first_frame: u64,
    /// Decode time of the first frame in the stream's continuous timeline (track timescale).
    pub decode_time: u64,
    pub track: Arc<VideoTrack>,
    /// Increases by one each time the codec private data changes.
    pub codec_generation: u64,
    pub init: Bytes,
    pub media: Bytes,
    pub samples: Vec<Sample>,
    /// Decode time of the audio track's first frame (audio ticks), when the stream has audio.
    pub audio_decode_time: Option<u64>,
    /// The video track's timescale (to move the audio's decode time with the video's).
    pub timescale: u32,
    /// The frames as GetMedia writes them (decode order, presentation offsets).
    pub blocks: Vec<Arc<LiveFrame>>,
    /// The AAC frames of the fragment's span (streams with audio).
    pub audio_frames: Vec<mp4::AudioSample>,
}

impl StoredFragment {
    pub fn frame_count(&self) -> u32 {
        u32::try_from(self.samples.len()).unwrap_or(u32::MAX)
    }
}

#[derive(Debug)]
pub(crate) struct StreamInfo {
    pub name: String,
    pub arn: String,
    pub created: SystemTime,
    pub version: String,
    pub status: StreamStatus,
    pub media_type: String,
    pub device_name: Option<String>,
    pub kms_key_id: String,
    pub retention_hours: u32,
}

pub(crate) struct StreamState {
    pub info: StreamInfo,
    pub rate: crate::FrameRate,
    pub ingest_delay: Duration,
    pub decode_time_origin: super::DecodeTimeOrigin,
    /// Serve media fragments with version-0 `tfdt` boxes where the decode time fits.
    pub tfdt_version_0: bool,
    /// An AAC track beside the video.
    pub audio: bool,
    /// The audio as a separate HLS rendition (`TrackNumber=2`) instead of inside the fragments.
    pub audio_separate: bool,
    pub camera_start: SystemTime,
    pub fragments: VecDeque<Arc<StoredFragment>>,
    pub ground_truth: Vec<FragmentRecord>,
    pub camera: Option<Camera>,
    pub faults: FaultState,
    next_index: u64,
    generation: u64,
    last_track: Option<Arc<VideoTrack>>,
    /// The fragment being ingested (GetMedia streams its frames as they come).
    pub live: Option<LiveFragment>,
    /// Bumped on every frame and fragment ingested: wakes GetMedia connections.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// GetMedia limits and counters.
    pub get_media: crate::media::Limits,
}

impl StreamState {
    /// The stream index the next fragment to be ingested will get.
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// The stored fragment with stream index `index`.
    pub fn find(&self, index: u64) -> Option<&Arc<StoredFragment>> {
        let first = self.fragments.front()?.index;
        let at = usize::try_from(index.checked_sub(first)?).ok()?;
        self.fragments.get(at).filter(|f| f.index == index)
    }

    /// The KVS-style fragment number of the fragment with stream index `index` (a long decimal
    /// string that grows with time, ending with the index in 15 digits).
    pub fn fragment_number(&self, index: u64) -> String {
        format!(
            "9134385233318{:020}{:015}",
            millis(self.info.created) % 100_000_000_000_000_000_000,
            index
        )
    }

    /// Time of the newest fragment's end on the server clock, if any.
    pub fn newest_server_end(&self) -> Option<SystemTime> {
        self.fragments.back().map(|f| f.server_start + f.duration)
    }
}

pub(crate) struct Settings {
    /// The data endpoint's URL (archived media and HLS), on a listener of its own.
    pub data_endpoint: String,
    pub region: String,
    pub max_fragments_per_stream: usize,
    pub list_streams_page_limit: Option<usize>,
}

pub(crate) struct State {
    pub settings: Settings,
    pub streams: Mutex<BTreeMap<String, StreamState>>,
    pub sessions: Mutex<HashMap<String, Session>>,
    /// Every session token issued, oldest first (for tests that look for leaks).
    pub issued_tokens: Mutex<Vec<String>>,
    stats: Mutex<RequestStats>,
    /// When each API call arrived, oldest first (bounded).
    api_log: Mutex<VecDeque<(std::time::Instant, String)>>,
    /// Added to the wall clock when session expiry is checked (see `Emulator::advance_session_clock`).
    clock_offset: Mutex<Duration>,
    /// API operations answered with an error whatever the request (see `refuse_api`).
    pub refusals: crate::refusals::Refusals,
}

/// API calls whose arrival times are kept.
const API_LOG_LIMIT: usize = 100_000;

pub(crate) fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

pub(crate) fn random_string(len: usize, alphabet: &[u8]) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl State {
    pub fn new(settings: Settings) -> Self {
        State {
            settings,
            streams: Mutex::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            issued_tokens: Mutex::new(Vec::new()),
            stats: Mutex::new(RequestStats::default()),
            api_log: Mutex::new(VecDeque::new()),
            clock_offset: Mutex::new(Duration::ZERO),
            refusals: crate::refusals::Refusals::default(),
        }
    }

    /// The clock session expiry is checked against.
    pub fn session_now(&self) -> SystemTime {
        SystemTime::now() + *self.clock_offset.lock()
    }

    pub fn advance_session_clock(&self, by: Duration) {
        *self.clock_offset.lock() += by;
    }

    pub fn arn(&self, name: &str, created: SystemTime) -> String {
        format!(
            "arn:aws:kinesisvideo:{}:{}:stream/{}/{}",
            self.settings.region,
            super::ACCOUNT_ID,
            name,
            millis(created)
        )
    }

    pub fn new_info(
        &self,
        name: &str,
        status: StreamStatus,
        media_type: Option<String>,
        device_name: Option<String>,
        kms_key_id: Option<String>,
        retention_hours: u32,
    ) -> StreamInfo {
        let created = SystemTime::now();
        StreamInfo {
            name: name.to_owned(),
            arn: self.arn(name, created),
            created,
            version: random_string(
                20,
                b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
            ),
            status,
            media_type: media_type.unwrap_or_default(),
            device_name,
            kms_key_id: kms_key_id.unwrap_or_else(|| {
                format!(
                    "arn:aws:kms:{}:{}:alias/aws/kinesisvideo",
                    self.settings.region,
                    super::ACCOUNT_ID
                )
            }),
            retention_hours,
        }
    }

    /// Inserts an empty stream (no camera); fails if the name is taken.
    pub fn insert_stream(
        &self,
        info: StreamInfo,
        rate: crate::FrameRate,
        ingest_delay: Duration,
        decode_time_origin: super::DecodeTimeOrigin,
    ) -> Result<()> {
        let mut streams = self.streams.lock();
        if streams.contains_key(&info.name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("the stream {} already exists", info.name),
            ));
        }
        let name = info.name.clone();
        streams.insert(
            name,
            StreamState {
                info,
                rate,
                ingest_delay,
                decode_time_origin,
                tfdt_version_0: false,
                audio: false,
                audio_separate: false,
                camera_start: SystemTime::now(),
                fragments: VecDeque::new(),
                ground_truth: Vec::new(),
                camera: None,
                faults: FaultState::default(),
                next_index: 0,
                generation: 0,
                last_track: None,
                live: None,
                changes: tokio::sync::watch::Sender::new(0),
                get_media: crate::media::Limits::default(),
            },
        );
        Ok(())
    }

    /// Adds a stream described by `spec` and starts its camera.
    pub fn add_stream(state: &Arc<State>, spec: StreamSpec) -> Result<()> {
        let info = state.new_info(
            &spec.name,
            spec.status,
            Some(spec.media_type.clone()),
            spec.device_name.clone(),
            None,
            spec.retention_hours,
        );
        state.insert_stream(info, spec.rate, spec.ingest_delay, spec.decode_time_origin)?;
        if let Some(stream) = state.streams.lock().get_mut(&spec.name) {
            stream.tfdt_version_0 = spec.tfdt_version_0;
            stream.audio = spec.audio;
            stream.audio_separate = spec.audio_layout == super::AudioLayout::SeparateRendition;
        }
        if !spec.camera {
            return Ok(());
        }
        // Producer times on whole milliseconds, like the timestamps KVS stores.
        let start = super::http::to_millis(
            SystemTime::now()
                .checked_sub(spec.history)
                .unwrap_or_else(SystemTime::now),
        );
        // A decode-time origin far from wall time: clients must use the program date time.
        let timescale_ticks = {
            let mut rng = rand::rng();
            rng.random_range(1_000_000u64..10_000_000) * 90_000
        };
        let config = CameraConfig {
            name: spec.name.clone(),
            width: spec.width,
            height: spec.height,
            rate: spec.rate,
            codec: spec.codec,
            b_frames: spec.b_frames,
            offsets: spec.offsets,
            frames_per_fragment: spec.frames_per_fragment(),
            bitrate_kbps: spec.bitrate_kbps,
            start,
            history: spec.history,
            decode_time_base: timescale_ticks,
            max_frames: (!spec.live).then(|| {
                let fpf = u64::from(spec.frames_per_fragment());
                let frames = (spec.history.as_secs_f64() * spec.rate.as_f64()).floor() as u64;
                (frames / fpf).max(1) * fpf
            }),
        };
        let weak = Arc::downgrade(state);
        let name = spec.name.clone();
        let camera = Camera::start(config, move |event| {
            if let Some(state) = weak.upgrade() {
                match event {
                    CameraEvent::Sample(sample) => state.ingest_frame(&name, sample),
                    CameraEvent::Fragment(fragment) => state.publish(&name, fragment),
                }
            }
        })
        .map_err(|e| e.context(format!("camera of stream {}", spec.name)))?;
        let orphan = {
            let mut streams = state.streams.lock();
            match streams.get_mut(&spec.name) {
                Some(stream) => {
                    stream.camera_start = start;
                    stream.camera = Some(camera);
                    None
                }
                None => Some(camera),
            }
        };
        // Stopped outside the lock: the camera thread may be waiting for it.
        if let Some(camera) = orphan {
            camera.stop();
        }
        Ok(())
    }

    /// Called from a camera thread for every access unit, as it is encoded: the fragment it
    /// belongs to is ingested (or dropped, when the camera is offline) from its first frame on.
    fn ingest_frame(&self, name: &str, sample: LiveSample) {
        let mut streams = self.streams.lock();
        let Some(stream) = streams.get_mut(name) else {
            return;
        };
        if stream
            .live
            .as_ref()
            .is_none_or(|l| l.camera_index != sample.fragment)
        {
            let header = (!stream.faults.camera_offline()).then(|| {
                let index = stream.next_index;
                Arc::new(LiveHeader {
                    index,
                    fragment_number: stream.fragment_number(index),
                    producer_start: match stream.faults.clock_shift() {
                        Some(shift) => shift.apply(sample.fragment_start),
                        None => sample.fragment_start,
                    },
                    server_start: sample.fragment_start + stream.ingest_delay,
                    track: Arc::clone(&sample.track),
                })
            });
            stream.live = Some(LiveFragment {
                camera_index: sample.fragment,
                header,
                frames: Vec::new(),
            });
        }
        let Some(live) = stream.live.as_mut() else {
            return;
        };
        if live.header.is_none() {
            return;
        }
        live.frames.push(Arc::new(LiveFrame {
            offset: sample
                .producer_time
                .duration_since(sample.fragment_start)
                .unwrap_or_default(),
            key: sample.sample.is_sync,
            data: sample.sample.data,
        }));
        stream.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Called from a camera thread for every finished fragment.
    fn publish(&self, name: &str, fragment: EncodedFragment) {
        let mut streams = self.streams.lock();
        let Some(stream) = streams.get_mut(name) else {
            return;
        };
        // Ingested or not was decided at its first frame.
        let live = stream.live.take_if(|l| l.camera_index == fragment.index);
        let (header, blocks) = match live {
            Some(LiveFragment {
                header: Some(header),
                frames,
                ..
            }) => (Some(header), frames),
            Some(LiveFragment { header: None, .. }) => {
                tracing::debug!(
                    stream = name,
                    index = fragment.index,
                    "camera offline: fragment dropped"
                );
                return;
            }
            None if stream.faults.camera_offline() => {
                tracing::debug!(
                    stream = name,
                    index = fragment.index,
                    "camera offline: fragment dropped"
                );
                return;
            }
            None => (None, Vec::new()),
        };
        let new_codec = stream
            .last_track
            .as_ref()
            .is_none_or(|t| **t != *fragment.track);
        if new_codec {
            if stream.last_track.is_some() {
                stream.generation += 1;
            }
            stream.last_track = Some(Arc::clone(&fragment.track));
        }
        // Audio: the AAC frames of the fragment's span, on a timeline whose origin is the
        // video's decode time origin (in audio ticks).
        let audio = match stream.audio.then(crate::audio::silence) {
            Some(Ok(silence)) => {
                let from = stream.rate.nanos(fragment.first_frame);
                let to = stream
                    .rate
                    .nanos(fragment.first_frame + fragment.samples.len() as u64);
                let (first, frames) = crate::audio::frames_for(silence, from, to);
                let ticks = u128::from(fragment.track.timescale.max(1));
                // The decode time of the camera's frame 0, in video ticks.
                let frame0 = fragment.decode_time.saturating_sub(
                    u64::try_from(stream.rate.nanos(fragment.first_frame) * ticks / 1_000_000_000)
                        .unwrap_or(0),
                );
                let base = u64::try_from(
                    u128::from(frame0) * u128::from(crate::audio::SAMPLE_RATE) / ticks,
                )
                .unwrap_or(0);
                Some((silence, base.saturating_add(first), frames))
            }
            Some(Err(e)) => {
                tracing::warn!(stream = name, error = %e, "no audio track");
                None
            }
            None => None,
        };
        // A separate audio rendition: the fragments hold the video alone.
        let muxed = if stream.audio_separate {
            None
        } else {
            audio.as_ref()
        };
        let init = match stream.fragments.back() {
            Some(prev) if !new_codec => prev.init.clone(),
            _ => Bytes::from(mp4::init_segment(
                &fragment.track,
                muxed.map(|(s, _, _)| &s.track),
            )),
        };
        let index = stream.next_index;
        stream.next_index += 1;
        let sequence = u32::try_from(index % u64::from(u32::MAX)).unwrap_or(0) + 1;
        let media = Bytes::from(mp4::media_segment_with_audio(
            sequence,
            fragment.decode_time,
            &fragment.samples,
            muxed.map(|(_, t, f)| (*t, f.as_slice())),
        ));
        let audio_decode_time = audio.as_ref().map(|(_, t, _)| *t);
        // The server clock is right; a shifted producer clock only moves producer timestamps.
        let server_start = fragment.producer_start + stream.ingest_delay;
        let producer_start = match (&header, stream.faults.clock_shift()) {
            (Some(header), _) => header.producer_start,
            (None, Some(shift)) => shift.apply(fragment.producer_start),
            (None, None) => fragment.producer_start,
        };
        let fragment_number = stream.fragment_number(index);
        let stored = Arc::new(StoredFragment {
            index,
            producer_start,
            server_start,
            duration: fragment.duration,
            first_frame: fragment.first_frame,
            decode_time: fragment.decode_time,
            track: Arc::clone(&fragment.track),
            codec_generation: stream.generation,
            init,
            media: media.clone(),
            timescale: fragment.track.timescale,
            samples: fragment.samples,
            audio_decode_time,
            blocks,
            audio_frames: audio.map(|(_, _, f)| f).unwrap_or_default(),
        });
        stream.ground_truth.push(FragmentRecord {
            index,
            fragment_number,
            producer_start: stored.producer_start,
            server_start,
            duration: stored.duration,
            frame_count: stored.frame_count(),
            first_frame: stored.first_frame,
            width: stored.track.width,
            height: stored.track.height,
            size: media.len(),
        });
        stream.fragments.push_back(stored);
        while stream.fragments.len() > self.settings.max_fragments_per_stream {
            stream.fragments.pop_front();
        }
        stream.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// GetMedia counters of a stream.
    pub fn get_media_stats(&self, name: &str) -> Option<crate::media::GetMediaStats> {
        self.streams.lock().get(name).map(|s| s.get_media.stats())
    }

    pub fn has_stream(&self, name: &str) -> bool {
        self.streams.lock().contains_key(name)
    }

    pub fn ground_truth(&self, name: &str) -> Vec<FragmentRecord> {
        self.streams
            .lock()
            .get(name)
            .map(|s| s.ground_truth.clone())
            .unwrap_or_default()
    }

    pub fn ground_truth_len(&self, name: &str) -> usize {
        self.streams
            .lock()
            .get(name)
            .map(|s| s.ground_truth.len())
            .unwrap_or(0)
    }

    pub fn frame_producer_time(&self, name: &str, frame: u64) -> Option<SystemTime> {
        let streams = self.streams.lock();
        let stream = streams.get(name)?;
        let rate = stream.rate;
        // From the fragment that holds the frame (its producer time may be shifted), else from
        // the camera's start.
        let i = stream
            .ground_truth
            .partition_point(|r| r.first_frame <= frame);
        if let Some(record) = i.checked_sub(1).and_then(|i| stream.ground_truth.get(i))
            && frame < record.first_frame + u64::from(record.frame_count)
        {
            let nanos = rate.nanos(frame - record.first_frame);
            return record
                .producer_start
                .checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?));
        }
        let nanos = rate.nanos(frame);
        Some(stream.camera_start + Duration::from_nanos(u64::try_from(nanos).ok()?))
    }

    /// Removes a stream: its camera stops and its sessions stop working.
    pub fn remove_stream(&self, name: &str) -> bool {
        let removed = self.streams.lock().remove(name);
        match removed {
            Some(mut stream) => {
                if let Some(camera) = stream.camera.take() {
                    camera.stop();
                }
                true
            }
            None => false,
        }
    }

    pub fn stop_cameras(&self) {
        let cameras: Vec<Camera> = self
            .streams
            .lock()
            .values_mut()
            .filter_map(|s| s.camera.take())
            .collect();
        for camera in cameras {
            camera.stop();
        }
    }

    /// When the calls of `operation` arrived, oldest first.
    pub fn api_call_times(&self, operation: &str) -> Vec<std::time::Instant> {
        self.api_log
            .lock()
            .iter()
            .filter(|(_, op)| op == operation)
            .map(|(t, _)| *t)
            .collect()
    }

    pub fn count_api(&self, operation: &str) {
        {
            let mut log = self.api_log.lock();
            log.push_back((std::time::Instant::now(), operation.to_owned()));
            while log.len() > API_LOG_LIMIT {
                log.pop_front();
            }
        }
        *self
            .stats
            .lock()
            .api_calls
            .entry(operation.to_owned())
            .or_default() += 1;
    }

    pub fn count_sessions_closed(&self, n: usize) {
        self.stats.lock().sessions_closed += n as u64;
    }

    pub fn count_error(&self, code: &str) {
        *self.stats.lock().errors.entry(code.to_owned()).or_default() += 1;
    }

    pub fn count_hls(&self, kind: super::session::HlsRequest) {
        use super::session::HlsRequest;
        let mut stats = self.stats.lock();
        match kind {
            HlsRequest::Master => stats.master_playlists += 1,
            HlsRequest::MediaPlaylist => stats.media_playlists += 1,
            HlsRequest::Init => stats.init_fragments += 1,
            HlsRequest::Fragment => stats.media_fragments += 1,
        }
    }

    pub fn request_stats(&self) -> RequestStats {
        self.stats.lock().clone()
    }
}
