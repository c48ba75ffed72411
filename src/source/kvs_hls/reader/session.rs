//! HLS sessions: opening and refreshing them, HTTP GETs with quick retries, the stall
//! watchdog, refusals.

use super::*;

impl Reader {
    /// Opens a session (a URL refresh when `refresh_pending`); the previous one, if any, is
    /// replaced only once the new one works.
    pub(super) async fn open_session(&mut self) -> Result<()> {
        let refresh = self.refresh_pending;
        let media = self
            .client
            .archived_media(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl)
            .await?;
        let mut selector =
            am::HlsFragmentSelector::builder().fragment_selector_type(match self.opts.selector {
                TimestampSelector::Producer => am::HlsFragmentSelectorType::ProducerTimestamp,
                TimestampSelector::Server => am::HlsFragmentSelectorType::ServerTimestamp,
            });
        let (mode, range) = match self.opts.playback {
            PlaybackMode::Live => (am::HlsPlaybackMode::Live, None),
            PlaybackMode::LiveReplay { start, end } => {
                (am::HlsPlaybackMode::LiveReplay, Some((start, end)))
            }
            PlaybackMode::OnDemand { start, end } => {
                (am::HlsPlaybackMode::OnDemand, Some((start, Some(end))))
            }
        };
        if let Some((start, end)) = range {
            // After a reconnect or at a continuation, resume after the last fragment fed.
            let start = self.range_start(start);
            if end.is_some_and(|end| start > end) {
                return Err(Error::new(
                    ErrorKind::NoFragments,
                    "every fragment of the requested range was read",
                ));
            }
            let mut r = am::HlsTimestampRange::builder().start_timestamp(start.into());
            if let Some(end) = end {
                r = r.end_timestamp(end.into());
            }
            selector = selector.timestamp_range(r.build());
        }
        let mut request = media
            .get_hls_streaming_session_url()
            .playback_mode(mode)
            .hls_fragment_selector(selector.build())
            .container_format(match self.opts.container {
                Container::FragmentedMp4 => am::ContainerFormat::FragmentedMp4,
                Container::MpegTs => am::ContainerFormat::MpegTs,
            })
            .display_fragment_timestamp(if self.opts.display_timestamps {
                am::HlsDisplayFragmentTimestamp::Always
            } else {
                am::HlsDisplayFragmentTimestamp::Never
            })
            .expires(i32::try_from(self.opts.expires.as_secs()).unwrap_or(43_200))
            .max_media_playlist_fragment_results(i64::from(self.playlist_limit()));
        request = match &self.opts.stream {
            StreamId::Name(n) => request.stream_name(n),
            StreamId::Arn(a) => request.stream_arn(a),
        };
        if let Some(mode) = self.opts.discontinuity {
            request = request.discontinuity_mode(match mode {
                DiscontinuityMode::Always => am::HlsDiscontinuityMode::Always,
                DiscontinuityMode::Never => am::HlsDiscontinuityMode::Never,
                DiscontinuityMode::OnDiscontinuity => am::HlsDiscontinuityMode::OnDiscontinuity,
            });
        }
        let requested = Instant::now();
        let output = match request.send().await {
            Ok(o) => o,
            Err(e) => {
                let error = Error::from_sdk("GetHLSStreamingSessionURL", e).context(format!(
                    "camera {}, stream {}",
                    self.camera(),
                    self.opts.stream
                ));
                // Only a failure that may come from a stale endpoint reloads it (GetDataEndpoint
                // has a quota of 5 TPS per stream): not "no fragments", not throttling.
                if matches!(
                    error.kind(),
                    ErrorKind::Network | ErrorKind::ServiceUnavailable | ErrorKind::Timeout
                ) {
                    self.client
                        .invalidate_endpoint(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl);
                }
                return Err(error);
            }
        };
        let master_url = output
            .hls_streaming_session_url()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "GetHLSStreamingSessionURL returned no URL",
                )
            })?
            .to_owned();
        let master = self.get_retrying(&master_url, "master playlist").await?;
        let media_url = hls::media_playlist_url(&master_url, &master)?;
        self.sessions_opened += 1;
        self.session = Some(Session {
            number: self.sessions_opened,
            media_url,
            expires_at: requested + self.opts.expires,
            inits: std::collections::HashMap::new(),
        });
        self.refresh_pending = false;
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.sessions += 1;
            if refresh {
                stats.url_refreshes += 1;
            }
        }
        if refresh && let Some(m) = &self.ctx.metrics {
            m.url_refresh(self.camera());
        }
        tracing::debug!(camera = %self.camera(), session = self.sessions_opened, refresh, "HLS session opened");
        Ok(())
    }

    /// GET with the request timeout and the stall watchdog; HTTP errors classified. The body is
    /// an owned buffer, so a fragment is rebased in place and handed to the decoder without a
    /// copy.
    pub(super) async fn get(&self, url: &str) -> Result<Vec<u8>> {
        let fetch = async {
            let response = self
                .http
                .get(url)
                .timeout(self.opts.request_timeout)
                .send()
                .await
                .map_err(Error::from_reqwest)?;
            let status = response.status();
            if !status.is_success() {
                let error_type = response
                    .headers()
                    .get("x-amzn-ErrorType")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = response.bytes().await.unwrap_or_default();
                return Err(Error::from_hls_response(
                    status.as_u16(),
                    error_type.as_deref(),
                    &body,
                ));
            }
            read_body(response).await
        };
        tokio::select! {
            r = fetch => r,
            e = self.watchdog() => Err(e),
            _ = self.ctx.stop_notify.notified() => Err(stopped()),
        }
    }

    /// [`get`](Self::get), retried quickly inside the session ([`QUICK_RETRIES`]) when the
    /// service or the network hiccuped; each failed attempt is a read error.
    pub(super) async fn get_retrying(&self, url: &str, what: &str) -> Result<Vec<u8>> {
        let mut attempt = 0;
        loop {
            let error = match self.get(url).await {
                Ok(body) => return Ok(body),
                Err(e) => e,
            };
            if attempt >= QUICK_RETRIES
                || !quick_retryable(&error)
                || self.ctx.stalled.load(Ordering::SeqCst)
            {
                return Err(error);
            }
            attempt += 1;
            self.count_read_error(&error);
            let delay = QUICK_RETRY_DELAY * 2u32.pow(attempt - 1);
            tracing::info!(camera = %self.camera(), what, attempt, %error, ?delay, "request failed: retrying in the session");
            self.ctx.sleep(delay).await?;
        }
    }

    /// Resolves when no frame has been decoded for `stall_timeout` while the reader keeps up
    /// (and marks the error as a stall).
    pub(super) async fn watchdog(&self) -> Error {
        loop {
            let idle = self.ctx.last_progress.lock().elapsed();
            if self.position.fed_any()
                && idle > self.opts.stall_timeout
                && !self.ctx.core.queue.is_full()
            {
                self.ctx.reset_progress();
                self.ctx.stalled.store(true, Ordering::SeqCst);
                return Error::new(
                    ErrorKind::Timeout,
                    format!("no frame decoded for {:?} (stall)", self.opts.stall_timeout),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub(super) fn session_expiring(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| Instant::now() + self.opts.refresh_margin >= s.expires_at)
    }

    /// A 403 on a playlist, init or fragment GET: the token expired, was revoked, or KVS closed
    /// the session because a sixth one of the stream was created. The session is replaced at
    /// once (a refresh); refused again and again without progress, it is an outage.
    pub(super) fn session_refused(&mut self, error: Error, refusals: &mut u32) -> Result<()> {
        *refusals += 1;
        if *refusals > REFUSALS_BEFORE_BACKOFF {
            return Err(error);
        }
        let early = self
            .session
            .as_ref()
            .is_some_and(|s| Instant::now() + self.opts.refresh_margin < s.expires_at);
        if early {
            // Not our expiry: revoked, or closed by another reader's session.
            self.ctx.core.stats.lock().sessions_lost += 1;
            if let Some(m) = &self.ctx.metrics {
                m.session_lost(self.camera());
            }
        }
        tracing::info!(camera = %self.camera(), %error, early, "session refused: refreshing");
        self.session = None;
        self.refresh_pending = true;
        Ok(())
    }
}

/// The most a `Content-Length` reserves up front: a larger (or hostile) length is not trusted
/// with an allocation before its bytes arrive; the buffer grows as they do.
const MAX_BODY_RESERVE: u64 = 64 << 20;

/// A response body assembled once, chunk by chunk, into one owned buffer sized from
/// `Content-Length` (where it is sane). `reqwest::Response::bytes` would hand back a shared
/// buffer, which the reader then had to copy to rebase it.
async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>> {
    let reserve = response.content_length().unwrap_or(0).min(MAX_BODY_RESERVE);
    let mut body = Vec::with_capacity(usize::try_from(reserve).unwrap_or(0));
    while let Some(chunk) = response.chunk().await.map_err(Error::from_reqwest)? {
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
