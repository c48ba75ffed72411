//! Following the media playlist: polling it, choosing the fragments to feed (continuing from
//! the last one fed, across sessions and clock steps) and counting what was skipped.

use super::*;

impl Reader {
    /// Follows the playlist until an error (or the end of a range).
    pub(super) async fn follow(&mut self) -> Result<Outcome> {
        let mut refusals = 0;
        loop {
            if self.ctx.stopped() {
                return Err(stopped());
            }
            self.take_decode_failure();
            if self.session.is_none() {
                self.open_session().await?;
            } else if self.session_expiring() {
                tracing::info!(camera = %self.camera(), "session expiring: refreshing");
                self.refresh_pending = true;
                self.open_session().await?;
            }
            let playlist = match self.poll().await {
                Ok(p) => p,
                Err(e) if e.kind() == ErrorKind::SessionExpired => {
                    self.session_refused(e, &mut refusals)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.ctx.set_state(SourceState::Connected);
            let selection = self.select(&playlist);
            if let Some((count, gap)) = selection.skipped {
                self.count_skipped(count, gap);
            }
            let mut contiguous = selection.contiguous;
            let mut refused = false;
            for segment in &selection.segments {
                match self.feed(segment, contiguous).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::SessionExpired => {
                        self.session_refused(e, &mut refusals)?;
                        refused = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
                contiguous = true;
                refusals = 0;
                self.failures = 0;
                {
                    let mut stats = self.ctx.core.stats.lock();
                    stats.consecutive_errors = 0;
                    stats.reconnecting_since = None;
                }
                self.take_decode_failure();
            }
            if refused {
                continue;
            }
            if playlist.end_list
                && !matches!(self.opts.playback, PlaybackMode::Live)
                && self.read_to_the_end(&playlist)
            {
                // A playlist holds at most MaxMediaPlaylistFragmentResults fragments: a full
                // one may not reach the end of the range, so continue in a new session that
                // starts just after the last fragment fed.
                let full = playlist.segments.len() >= self.playlist_limit() as usize;
                if !(full && self.position.last_pdt().is_some()) {
                    return Ok(Outcome::Finished);
                }
                tracing::debug!(camera = %self.camera(), "range continues in a new session");
                match self.open_session().await {
                    Ok(()) => continue,
                    Err(e) if e.kind() == ErrorKind::NoFragments => return Ok(Outcome::Finished),
                    Err(e) => return Err(e),
                }
            }
            let pause = self.opts.poll_interval;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                e = self.watchdog() => return Err(e),
                _ = self.ctx.wake.notified() => {}
                _ = self.ctx.stop_notify.notified() => return Err(stopped()),
            }
        }
    }

    /// Whether every fragment of this session's (complete) playlist was fed.
    pub(super) fn read_to_the_end(&self, playlist: &MediaPlaylist) -> bool {
        let Some(listed) = playlist.segments.last() else {
            return true;
        };
        self.position
            .last()
            .is_some_and(|f| f.session == self.session_number() && f.sequence >= listed.sequence)
    }

    pub(super) async fn poll(&mut self) -> Result<MediaPlaylist> {
        let url = self
            .session
            .as_ref()
            .map(|s| s.media_url.clone())
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no session"))?;
        let text = self.get_retrying(&url, "media playlist").await?;
        self.ctx.core.stats.lock().playlist_polls += 1;
        hls::parse_media_playlist(&url, &text)
    }

    /// Counts fragments that left the playlist window before they were fetched.
    pub(super) fn count_skipped(&self, count: u64, gap: Option<Duration>) {
        tracing::warn!(
            camera = %self.camera(),
            fragments = count,
            gap = ?gap,
            "fragments left the playlist window before they were fetched: skipped"
        );
        self.ctx.core.stats.lock().fragments_skipped += count;
        if let Some(m) = &self.ctx.metrics {
            m.fragments_skipped(self.camera(), count);
        }
    }

    /// The fragments of `playlist` not yet fed, in order.
    ///
    /// Inside a session the media sequence decides, whatever the program date times do (a
    /// producer clock may step either way). In a new session the newest listed fragment that
    /// was fed already is found by its program date time (the fragment listed before it must
    /// not be a fed fragment from elsewhere, which tells apart the same time before and after a
    /// clock step); everything after it is new.
    pub(super) fn select(&self, playlist: &MediaPlaylist) -> Selection {
        let mut selection = self.select_unfed(playlist);
        self.skip_too_old(&mut selection);
        selection
    }

    /// With `max_frame_age` (LIVE only): the leading fragments of `selection` that ended more
    /// than that long ago are left out (all their frames would be dropped as too old), the
    /// newest always kept; counted in `fragments_too_old`.
    fn skip_too_old(&self, selection: &mut Selection) {
        let Some(max_age) = self.opts.common.max_frame_age else {
            return;
        };
        let Some(edge) = SystemTime::now().checked_sub(max_age) else {
            return;
        };
        let old = selection
            .segments
            .iter()
            .take(selection.segments.len().saturating_sub(1))
            .take_while(|s| {
                s.program_date_time
                    .and_then(|t| t.checked_add(s.duration))
                    .is_some_and(|end| end < edge)
            })
            .count();
        if old == 0 {
            return;
        }
        selection.segments.drain(..old);
        selection.contiguous = false;
        tracing::info!(camera = %self.camera(), fragments = old, ?max_age, "fragments older than max_frame_age: going on at the live edge");
        self.ctx.core.stats.lock().fragments_too_old += old as u64;
    }

    /// The fragments of `playlist` not yet fed, in order (see [`select`](Self::select)).
    fn select_unfed(&self, playlist: &MediaPlaylist) -> Selection {
        let segments = &playlist.segments;
        let live = matches!(self.opts.playback, PlaybackMode::Live);
        let Some(last) = self.position.last() else {
            // The first fragment ever: LIVE starts at the newest (lowest latency).
            return Selection::start(segments, live);
        };
        if last.session == self.session_number() {
            let fresh: Vec<Segment> = segments
                .iter()
                .filter(|s| s.sequence > last.sequence)
                .cloned()
                .collect();
            let skipped = fresh.first().and_then(|first| {
                let missing = first.sequence.checked_sub(last.sequence)?.checked_sub(1)?;
                (missing > 0).then(|| (missing, gap_after(&last, first)))
            });
            return Selection {
                contiguous: skipped.is_none(),
                segments: fresh,
                skipped,
            };
        }
        if let Some(i) = self.newest_fed(segments) {
            return Selection {
                segments: segments.get(i + 1..).unwrap_or_default().to_vec(),
                contiguous: true,
                skipped: None,
            };
        }
        // None of the listed fragments was fed.
        let timed = last.pdt.is_some() && segments.iter().all(|s| s.program_date_time.is_some());
        if !timed {
            // Without program date times fragments cannot be matched across sessions: LIVE
            // goes on at the newest fragment, a range with everything listed.
            return Selection::start(segments, live);
        }
        // LIVE: the window moved past the last fragment fed (a range continues after it).
        let gap = segments.first().and_then(|first| gap_after(&last, first));
        let skipped = gap.filter(|g| live && *g > CLOCK_STEP).map(|g| {
            let each = last.duration.max(Duration::from_millis(100));
            let n = (g.as_secs_f64() / each.as_secs_f64()).round();
            (if n >= 1.0 { n as u64 } else { 1 }, Some(g))
        });
        Selection {
            segments: segments.clone(),
            contiguous: gap.is_some_and(|g| g <= CLOCK_STEP),
            skipped,
        }
    }

    /// The index of the newest listed fragment that was fed already, matched by program date
    /// time.
    pub(super) fn newest_fed(&self, segments: &[Segment]) -> Option<usize> {
        (0..segments.len()).rev().find(|&i| {
            let at = self.position.fed_at_time(segments[i].program_date_time);
            if at.is_empty() {
                return false;
            }
            let Some(before) = i.checked_sub(1).and_then(|b| segments.get(b)) else {
                return true;
            };
            let before_at = self.position.fed_at_time(before.program_date_time);
            // The fragment before is not a fed one (a gap), or it is the one fed just before.
            before_at.is_empty()
                || at
                    .iter()
                    .any(|j| j.checked_sub(1).is_some_and(|p| before_at.contains(&p)))
        })
    }

    /// Notes a step of the producer clock between the last fragment fed and `segment`, which
    /// directly follows it.
    pub(super) fn note_clock_step(&self, segment: &Segment) {
        let Some(last) = self.position.last() else {
            return;
        };
        let (Some(prev), Some(now)) = (last.pdt, segment.program_date_time) else {
            return;
        };
        let Some(expected) = prev.checked_add(last.duration) else {
            return;
        };
        let (forward, size) = signed_diff(expected, now);
        let step = if forward {
            // A gap forward is a camera outage when as much wall time passed (LIVE only: an
            // archive read at full speed has no wall time to compare with).
            let waited = self.position.fed_at.map_or(Duration::ZERO, |t| t.elapsed());
            matches!(self.opts.playback, PlaybackMode::Live) && size > CLOCK_STEP + waited
        } else {
            size > CLOCK_STEP
        };
        if step {
            tracing::warn!(
                camera = %self.camera(),
                direction = if forward { "forward" } else { "back" },
                step = ?size,
                "the producer clock stepped: following the media sequence"
            );
            self.ctx.core.stats.lock().clock_steps += 1;
            if let Some(m) = &self.ctx.metrics {
                m.clock_step(self.camera());
            }
        }
    }
}

/// The producer time between the end of fragment `last` and the start of `next`, if `next`
/// starts later.
fn gap_after(last: &Fed, next: &Segment) -> Option<Duration> {
    let end = last.pdt?.checked_add(last.duration)?;
    next.program_date_time?.duration_since(end).ok()
}
