//! One connection to the URI: the GStreamer pipeline, the bus watch, how its errors are
//! classified, producer times from RTSP sender reports, and the reconnect loop.

use super::*;

/// Classifies a GStreamer error of a URI pipeline.
pub(super) fn classify(kind: UriKind, err: &gst::message::Error) -> Error {
    let gerr = err.error();
    let debug = decode::error_debug(err);
    let message = format!(
        "{} (from {}{}{})",
        gerr.message(),
        decode::error_source(err),
        if debug.is_empty() { "" } else { ": " },
        debug
    );
    // rtspsrc could not SETUP the stream (typically 461 Unsupported Transport: a camera that
    // serves only UDP, or only TCP); the head then reports a missing plug-in, which would
    // send users looking for packages. The camera may also be full for a while: transient.
    if kind == UriKind::Rtsp && debug.contains("gst_rtspsrc_setup_streams") {
        return Error::new(
            ErrorKind::Network,
            format!(
                "the RTSP server refused to set up the stream: the transport may be unsupported \
                 (try another rtsp_transport, e.g. RtspTransport::Auto): {message}"
            ),
        );
    }
    let resource = gerr.kind::<gst::ResourceError>();
    let stream = gerr.kind::<gst::StreamError>();
    let error_kind = if matches!(resource, Some(gst::ResourceError::NotAuthorized))
        || debug.contains("401")
            && (debug.contains("Unauthorized") || debug.contains("Unauthorised"))
    {
        ErrorKind::NotAuthorized
    } else if resource.is_some() {
        match kind {
            UriKind::File => ErrorKind::Io,
            // Refused, reset, not found (a relay without a publisher answers 404), read
            // failures: the camera may come back.
            UriKind::Rtsp | UriKind::Http => ErrorKind::Network,
        }
    } else if matches!(
        stream,
        Some(
            gst::StreamError::TypeNotFound
                | gst::StreamError::WrongType
                | gst::StreamError::NotImplemented
                | gst::StreamError::Format
        )
    ) {
        ErrorKind::UnsupportedMedia
    } else {
        // Decode (transient) or Pipeline (a missing plugin or decoder), as for KVS sources.
        Error::from(gerr.clone()).kind()
    };
    Error::new(error_kind, message)
}

/// How a connection ended without an error.
pub(super) enum End {
    /// End-of-stream with `Finish`.
    Finished,
    /// End-of-stream with `Loop`.
    Loop,
}

/// The NTP time of RTP packets leaving `rtspsrc`, with their PTS: frames whose decoded buffers
/// lost the reference-timestamp meta get `ntp + (pts − pts_ref)` from the newest pair.
pub(super) type NtpAnchor = Arc<Mutex<Option<(gst::ClockTime, SystemTime)>>>;

/// The NTP time of a frame at `pts` from an anchor `(pts_ref, ntp_ref)` seen on the RTP
/// packets (for decoders that do not carry the reference-timestamp meta through).
pub(super) fn extrapolate(
    anchor: (gst::ClockTime, SystemTime),
    pts: Duration,
) -> Option<SystemTime> {
    let (pts_ref, ntp_ref) = anchor;
    let pts_ref = Duration::from_nanos(pts_ref.nseconds());
    if pts >= pts_ref {
        ntp_ref.checked_add(pts - pts_ref)
    } else {
        ntp_ref.checked_sub(pts_ref - pts)
    }
}

/// Builds one connection's pipeline: urisourcebin → parsebin → decoder → shared tail.
pub(super) fn build_pipeline(
    ctx: &Arc<Ctx>,
    opts: &Options,
    events: mpsc::UnboundedSender<Event>,
) -> Result<gst::Pipeline> {
    let number = ctx.pipelines_built.load(Ordering::Relaxed) + 1;
    let pipeline = gst::Pipeline::with_name(&format!("kvs-frames-uri-{}-{number}", ctx.camera_id));
    let (head, source) = decode::uri_decode_bin("decode", opts.target.uri.as_str())?;
    pipeline.add(&head).map_err(Error::from)?;

    // Configure the source element urisourcebin creates for the URI.
    let anchor: NtpAnchor = Arc::new(Mutex::new(None));
    let setup_anchor = Arc::clone(&anchor);
    let user = opts.target.user.clone();
    let password = opts.target.password.clone();
    let rtsps = opts.target.uri.starts_with("rtsps:");
    let protocols = if rtsps {
        format!("{}+tls", opts.rtsp_transport.protocols())
    } else {
        opts.rtsp_transport.protocols().to_owned()
    };
    let latency = u32::try_from(opts.rtsp_latency.as_millis()).unwrap_or(u32::MAX);
    source.connect("source-setup", false, move |values| {
        let element = values.get(1).and_then(|v| v.get::<gst::Element>().ok())?;
        let has = |name: &str| element.find_property(name).is_some();
        if has("protocols") && has("latency") {
            // rtspsrc
            element.set_property_from_str("protocols", &protocols);
            element.set_property("latency", latency);
            if has("add-reference-timestamp-meta") {
                element.set_property("add-reference-timestamp-meta", true);
            }
            let anchor = Arc::clone(&setup_anchor);
            element.connect_pad_added(move |_, pad| {
                let anchor = Arc::clone(&anchor);
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                    if let Some(buffer) = info.buffer()
                        && let (Some(pts), Some(ntp)) =
                            (buffer.pts(), decode::ntp_reference(buffer))
                    {
                        *anchor.lock() = Some((pts, ntp));
                    }
                    gst::PadProbeReturn::Ok
                });
            });
        }
        if let Some(user) = &user
            && has("user-id")
        {
            element.set_property("user-id", user.as_str());
        }
        if let Some(password) = &password
            && has("user-pw")
        {
            element.set_property("user-pw", password.as_str());
        }
        None
    });

    let stamp: Stamp = Box::new(move |pts, reference| {
        let ntp = reference.or_else(|| extrapolate((*anchor.lock())?, pts?));
        (ntp, None)
    });
    let sink: Arc<dyn FrameSink> = Arc::new(Sink(Arc::clone(ctx)));
    let eos_events = events.clone();
    decode::add_tail(
        &pipeline,
        head.upcast_ref(),
        &opts.decode,
        &sink,
        TailHooks {
            stamp,
            on_eos: Box::new(move || {
                let _ = eos_events.send(Event::Eos);
            }),
        },
    )?;
    if opts.realtime
        && let Some(appsink) = pipeline.by_name("sink")
    {
        appsink.set_property("sync", true);
    }
    let kind = opts.target.kind;
    let failed = AtomicBool::new(false);
    decode::on_bus_error(&pipeline, move |err| {
        // The first error of a pipeline is the cause; the rest follow from it.
        if !failed.swap(true, Ordering::SeqCst) {
            let _ = events.send(Event::Error(classify(kind, err)));
        }
    })?;
    Ok(pipeline)
}

/// Releases a pipeline off the async threads (an RTSP teardown may take a moment).
pub(super) async fn release(pipeline: gst::Pipeline) {
    let _ = tokio::task::spawn_blocking(move || {
        let _ = pipeline.set_state(gst::State::Null);
    })
    .await;
}

/// One connection: builds and starts a pipeline, then waits for its end.
pub(super) async fn connection(ctx: &Arc<Ctx>, opts: &Options) -> Result<End> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pipeline = build_pipeline(ctx, opts, tx)?;
    ctx.connection_frames.store(0, Ordering::Relaxed);
    ctx.reset_progress();
    {
        let mut slot = ctx.pipeline.lock();
        if ctx.stopped() {
            return Err(stopped());
        }
        *slot = Some(pipeline.clone());
    }
    ctx.pipelines_built.fetch_add(1, Ordering::Relaxed);
    ctx.core.stats.lock().sessions += 1;
    tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, "connecting");
    // State changes may block (a source element opening its input): off the async threads.
    let starting = pipeline.clone();
    let starting_ctx = Arc::clone(ctx);
    let started = tokio::task::spawn_blocking(move || {
        let started = starting.set_state(gst::State::Playing);
        // stop() may have released the pipeline while it was starting (or aborted this task):
        // it must not stay PLAYING.
        if starting_ctx.stopped() {
            let _ = starting.set_state(gst::State::Null);
        }
        started
    })
    .await
    .unwrap_or(Err(gst::StateChangeError));
    let result = match started {
        // A source that fails at once (a file it cannot open) posts its error synchronously.
        Err(_) => Err(match rx.try_recv() {
            Ok(Event::Error(e)) => e,
            _ => Error::new(
                ErrorKind::Pipeline,
                format!("the pipeline for {} does not start", ctx.display),
            ),
        }),
        Ok(_) => watch(ctx, opts, &mut rx).await,
    };
    let mine = {
        let mut slot = ctx.pipeline.lock();
        let mine = slot.as_ref() == Some(&pipeline);
        if mine {
            *slot = None;
        }
        mine
    };
    if mine {
        release(pipeline).await;
    }
    result
}

/// Waits for an error, end-of-stream, a stall or stop.
pub(super) async fn watch(
    ctx: &Arc<Ctx>,
    opts: &Options,
    rx: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<End> {
    loop {
        let notified = ctx.stop_notify.notified();
        if ctx.stopped() {
            return Err(stopped());
        }
        tokio::select! {
            event = rx.recv() => match event {
                Some(Event::Error(e)) => return Err(e),
                Some(Event::Eos) => {
                    return match opts.end_of_stream {
                        EndOfStream::Finish => Ok(End::Finished),
                        EndOfStream::Loop => Ok(End::Loop),
                        EndOfStream::Reconnect => Err(Error::new(
                            ErrorKind::Network,
                            "the live stream ended (end-of-stream): reconnecting",
                        )),
                    };
                }
                None => return Err(Error::new(ErrorKind::Internal, "the pipeline's event channel closed")),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                let idle = ctx.last_progress.lock().elapsed();
                if idle > opts.stall_timeout && !ctx.core.queue.is_full() {
                    let what = if ctx.connection_frames.load(Ordering::Relaxed) == 0 {
                        "no frame since connecting"
                    } else {
                        "no frame decoded"
                    };
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!("{what} for {:?} (stall)", opts.stall_timeout),
                    ));
                }
            }
            _ = notified => return Err(stopped()),
        }
    }
}

pub(super) fn fail(ctx: &Ctx, error: Error) {
    tracing::error!(camera = %ctx.camera_id, uri = %ctx.display, %error, "source failed");
    ctx.core.stats.lock().last_error = Some(error.to_string());
    ctx.set_state(SourceState::Error);
    ctx.core.queue.fail(error);
}

pub(super) async fn run(ctx: Arc<Ctx>, opts: Options) {
    // Whatever ends this task (a panic, a runtime shutdown), the iterator ends too.
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| {
        if !guard_ctx.stopped() {
            fail(&guard_ctx, e);
        }
    });
    let mut failures: u32 = 0;
    loop {
        if ctx.stopped() {
            return;
        }
        let result = connection(&ctx, &opts).await;
        if ctx.connection_frames.load(Ordering::Relaxed) > 0 {
            failures = 0;
        }
        let error = match result {
            Ok(End::Finished) => {
                tracing::info!(camera = %ctx.camera_id, uri = %ctx.display, "end of stream");
                // The state first: a reader that sees the end sees why.
                ctx.set_state(SourceState::Disconnected);
                ctx.core.queue.finish();
                return;
            }
            Ok(End::Loop) => {
                tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, "end of stream: starting again");
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Stopped => return,
            Err(e) => e.context(format!("camera {}, {}", ctx.camera_id, ctx.display)),
        };
        {
            let mut stats = ctx.core.stats.lock();
            stats.read_errors += 1;
            stats.last_error = Some(error.to_string());
            if error.kind() == ErrorKind::Decode {
                stats.decode_errors += 1;
            }
        }
        if let Some(m) = &ctx.metrics {
            m.read_error(&ctx.camera_id);
        }
        if !error.is_transient() {
            fail(&ctx, error);
            return;
        }
        if ctx.kind == UriKind::File {
            // Reading the file again would repeat its frames.
            fail(
                &ctx,
                error.context("a file is not read again after an error"),
            );
            return;
        }
        failures += 1;
        {
            let mut stats = ctx.core.stats.lock();
            stats.consecutive_errors = failures;
            if stats.reconnecting_since.is_none() {
                stats.reconnecting_since = Some(SystemTime::now());
            }
        }
        if opts.backoff.exhausted(failures) {
            fail(
                &ctx,
                error.context(format!("giving up after {failures} consecutive errors")),
            );
            return;
        }
        let delay = opts.backoff.delay(failures);
        tracing::warn!(camera = %ctx.camera_id, %error, ?delay, attempt = failures, "reconnecting after backoff");
        ctx.set_state(SourceState::Reconnecting);
        {
            let mut stats = ctx.core.stats.lock();
            stats.reconnects += 1;
            stats.backoff_history.push(delay);
            if stats.backoff_history.len() > 32 {
                stats.backoff_history.remove(0);
            }
        }
        if let Some(m) = &ctx.metrics {
            m.reconnect(&ctx.camera_id);
        }
        if ctx.sleep(delay).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_without_the_meta_are_placed_from_the_newest_anchor() {
        let ntp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let anchor = (gst::ClockTime::from_mseconds(4_000), ntp);
        assert_eq!(
            extrapolate(anchor, Duration::from_millis(4_040)),
            Some(ntp + Duration::from_millis(40))
        );
        assert_eq!(
            extrapolate(anchor, Duration::from_millis(3_960)),
            Some(ntp - Duration::from_millis(40))
        );
    }

    #[test]
    fn ntp_times_map_to_unix_time() {
        let unix = Duration::from_secs(1_700_000_000);
        let ntp = (unix + Duration::from_secs(2_208_988_800)).as_nanos() as u64;
        assert_eq!(
            decode::ntp_to_system_time(ntp),
            Some(SystemTime::UNIX_EPOCH + unix)
        );
        assert_eq!(decode::ntp_to_system_time(5), None);
    }
}
