//! Feeding one fragment to the decoder: its init segment, the fetch, the `tfdt` rebasing onto
//! the decoder timeline.

use super::*;
use crate::decode::UnitInput;

impl Reader {
    pub(super) async fn feed(&mut self, segment: &Segment, contiguous: bool) -> Result<()> {
        let init = match &segment.map_url {
            Some(url) => Some(self.init(url).await?),
            None => None,
        };
        match &init {
            // A new codec configuration may bring a new timescale: parse each init once.
            Some(init) if self.position.init.as_ref() != Some(init) => {
                self.position.timescale = Some(fmp4::init_timescale(init)?);
                // Other tracks (audio) are rebased in their own timescale; an init whose
                // other tracks cannot be read leaves them moving like the video.
                self.position.track_timescales =
                    fmp4::init_track_timescales(init).unwrap_or_default();
                self.position.init = Some(init.clone());
            }
            Some(_) => {}
            None if self.opts.container == Container::MpegTs => {}
            None if self.position.timescale.is_none() => {
                return Err(Error::new(
                    ErrorKind::UnsupportedMedia,
                    "the playlist has no EXT-X-MAP (fMP4 init segment)",
                ));
            }
            None => {}
        }
        let started = Instant::now();
        let mut data = self.get_retrying(&segment.url, "media fragment").await?;
        let fetch = started.elapsed();
        if contiguous {
            self.note_clock_step(segment);
        }
        if self.opts.container == Container::MpegTs {
            return self.feed_ts(segment, data, fetch).await;
        }
        // The decoder's timeline: program date time − the first one, which keeps gaps and makes
        // producer time = first program date time + PTS; but never backwards (a producer clock
        // that stepped back): then right after the previous fragment. The program date time is
        // when the fragment's first frame is *shown*: with B-frames that is after its decode
        // time (the presentation lead), so the decode time goes that much earlier; the epoch
        // leaves room for the first fragment's lead.
        let timescale = u128::from(self.position.timescale.unwrap_or(90_000));
        // A fragment whose track fragment cannot be read is the decoder's to judge (a decode
        // error), as before: no lead then, and nothing rewritten.
        let lead_ticks = match fmp4::normalize_composition_offsets(&mut data)
            .and_then(|_| fmp4::presentation_lead(&data))
        {
            Ok(lead) => lead,
            Err(e) => {
                tracing::debug!(camera = %self.camera(), error = %e, "composition offsets unreadable: lead 0");
                0
            }
        };
        let lead = Duration::from_nanos(
            u64::try_from(u128::from(lead_ticks.unsigned_abs()) * 1_000_000_000 / timescale)
                .unwrap_or(u64::MAX),
        );
        let natural = match (segment.program_date_time, self.position.epoch) {
            (Some(pdt), Some(epoch)) => pdt.duration_since(epoch).ok(),
            (Some(pdt), None) => {
                let epoch = if lead_ticks > 0 {
                    pdt.checked_sub(lead).unwrap_or(pdt)
                } else {
                    pdt
                };
                self.position.epoch = Some(epoch);
                self.decoder.set_epoch(epoch);
                pdt.duration_since(epoch).ok()
            }
            (None, _) => None,
        };
        let start = match natural {
            Some(n) if n + TIMELINE_SLACK >= self.position.cursor => n,
            _ => self.position.cursor,
        };
        let ticks = u64::try_from(start.as_nanos() * timescale / 1_000_000_000).map_err(|_| {
            Error::new(
                ErrorKind::Protocol,
                format!("a fragment starts {start:?} into the stream: beyond the decode timeline"),
            )
        })?;
        let decode_ticks = if lead_ticks >= 0 {
            ticks.saturating_sub(lead_ticks.unsigned_abs())
        } else {
            ticks.saturating_add(lead_ticks.unsigned_abs())
        };
        fmp4::rebase(&mut data, decode_ticks, &self.position.track_timescales)?;
        self.position.cursor = start.checked_add(segment.duration).unwrap_or(start);
        let bytes = data.len();
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.fragments_fetched += 1;
            stats.bytes_fetched += bytes as u64;
        }
        if let Some(m) = &self.ctx.metrics {
            m.fragment(self.camera(), bytes, fetch);
        }
        let session = self.session_number();
        if !self.position.fed_any() {
            self.ctx.reset_progress();
        }
        self.decoder
            .push(FragmentInput {
                init,
                data: Bytes::from(data),
                start,
                id: FragmentId {
                    program_date_time: segment.program_date_time,
                    media_sequence: segment.sequence,
                    session,
                    fragment_number: None,
                    server_time: None,
                },
            })
            .await?;
        self.note_fed(segment, session);
        Ok(())
    }

    /// An MPEG-TS segment: its access units go to the decoder's elementary head with
    /// presentation times on the source's timeline (program date time − epoch, never backwards).
    async fn feed_ts(&mut self, segment: &Segment, data: Vec<u8>, fetch: Duration) -> Result<()> {
        let bytes = data.len();
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.fragments_fetched += 1;
            stats.bytes_fetched += bytes as u64;
        }
        if let Some(m) = &self.ctx.metrics {
            m.fragment(self.camera(), bytes, fetch);
        }
        let session = self.session_number();
        let natural = match (segment.program_date_time, self.position.epoch) {
            (Some(pdt), Some(epoch)) => pdt.duration_since(epoch).ok(),
            (Some(pdt), None) => {
                self.position.epoch = Some(pdt);
                self.decoder.set_epoch(pdt);
                Some(Duration::ZERO)
            }
            (None, _) => None,
        };
        let start = match natural {
            Some(n) if n + TIMELINE_SLACK >= self.position.cursor => n,
            _ => self.position.cursor,
        };
        self.position.cursor = start.checked_add(segment.duration).unwrap_or(start);
        self.note_fed(segment, session);
        // A segment that cannot be demuxed is lost (counted), like one the decoder refuses.
        let video = match hls::ts::demux(&data) {
            Ok(v) => v,
            Err(error) => {
                tracing::warn!(camera = %self.camera(), %error, sequence = segment.sequence, "MPEG-TS segment unreadable: its frames are lost");
                self.ctx.core.stats.lock().decode_errors += 1;
                self.count_read_error(&error);
                return Ok(());
            }
        };
        let caps = gstreamer::Caps::builder(match video.codec {
            hls::ts::TsCodec::H264 => "video/x-h264",
            hls::ts::TsCodec::H265 => "video/x-h265",
        })
        .field("stream-format", "byte-stream")
        .field("alignment", "au")
        .build();
        if self.position.fed.len() <= 1 {
            self.ctx.reset_progress();
        }
        let mut first = Some((
            start,
            FragmentId {
                program_date_time: segment.program_date_time,
                media_sequence: segment.sequence,
                session,
                fragment_number: None,
                server_time: None,
            },
        ));
        for unit in video.units {
            let offset = Duration::from_nanos(unit.offset.saturating_mul(100_000) / 9);
            self.decoder
                .push_unit(UnitInput {
                    caps: caps.clone(),
                    data: unit.data,
                    pts: start.saturating_add(offset),
                    key: unit.key,
                    fragment: first.take(),
                })
                .await?;
        }
        Ok(())
    }

    /// Remembers that `segment` of session `session` went to the decoder.
    fn note_fed(&mut self, segment: &Segment, session: u64) {
        self.position.fed.push_back(Fed {
            session,
            sequence: segment.sequence,
            pdt: segment.program_date_time,
            duration: segment.duration,
        });
        while self.position.fed.len() > FED_HISTORY {
            self.position.fed.pop_front();
        }
        self.position.fed_at = Some(Instant::now());
    }

    pub(super) async fn init(&mut self, url: &str) -> Result<Bytes> {
        if let Some(b) = self.session.as_ref().and_then(|s| s.inits.get(url)) {
            return Ok(b.clone());
        }
        let bytes = Bytes::from(self.get_retrying(url, "init segment").await?);
        self.ctx.core.stats.lock().bytes_fetched += bytes.len() as u64;
        if let Some(m) = &self.ctx.metrics {
            m.init_segment(self.camera(), bytes.len());
        }
        if let Some(s) = self.session.as_mut() {
            s.inits.insert(url.to_owned(), bytes.clone());
        }
        Ok(bytes)
    }
}
