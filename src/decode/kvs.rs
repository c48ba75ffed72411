//! The KVS head: the [`Decoder`] thread that takes fragments (init + fMP4) into an appsrc
//! and parsebin + decoder ([`head`]), rebuilds its pipeline after a bus error, and ends with EOS.

use super::*;

pub(super) enum Command {
    Fragment(FragmentInput),
    /// One access unit (elementary head).
    Unit(UnitInput),
    /// End of stream: flush the decoder (its last frames) and answer when the appsink saw EOS.
    Finish(tokio::sync::oneshot::Sender<()>),
}

pub(super) struct Timeline {
    /// Program date time at timeline 0, if known.
    epoch: Option<SystemTime>,
    /// (start on the timeline, fragment), oldest first.
    fragments: VecDeque<(Duration, FragmentId)>,
}

pub(super) struct Shared {
    timeline: Mutex<Timeline>,
    failed: AtomicBool,
    stopping: AtomicBool,
    pipeline: Mutex<Option<gst::Pipeline>>,
    pipelines_built: std::sync::atomic::AtomicU64,
    /// Set by the appsink when end-of-stream reached it.
    eos: (parking_lot::Mutex<bool>, parking_lot::Condvar),
    /// What the appsrc takes: fMP4 bytes, or access units with caps and timestamps.
    head: Head,
}

/// What a [`Decoder`] is fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Head {
    /// Init segments and fMP4 fragments (HLS), demuxed by `qtdemux`.
    Fmp4,
    /// Timestamped access units with their caps (`video/x-h264,stream-format=avc` +
    /// `codec_data`, …): the GetMedia reader's demuxed MKV blocks.
    Elementary,
}

/// Handle of the decoder thread.
pub(crate) struct Decoder {
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Command>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Decoder {
    /// Starts the decoder thread; the pipeline is built before this returns, so a missing
    /// plugin is reported here. `head` says what it is fed (fMP4 bytes or access units).
    pub fn start_with(
        config: DecodeConfig,
        sink: Arc<dyn FrameSink>,
        head: Head,
    ) -> Result<Decoder> {
        crate::elements::init()?;
        let shared = Arc::new(Shared {
            timeline: Mutex::new(Timeline {
                epoch: None,
                fragments: VecDeque::new(),
            }),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            pipeline: Mutex::new(None),
            pipelines_built: std::sync::atomic::AtomicU64::new(0),
            eos: (parking_lot::Mutex::new(false), parking_lot::Condvar::new()),
            head,
        });
        let first = build_pipeline(&config, &shared, &sink)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Command>(2);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("kvs-decode-{}", config.name))
            .spawn(move || run(config, thread_shared, sink, rx, first))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("cannot start the decoder thread: {e}"),
                )
            })?;
        Ok(Decoder {
            tx: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sets the program date time of timeline 0 (once, from the first fragment that has one).
    pub fn set_epoch(&self, epoch: SystemTime) {
        let mut timeline = self.shared.timeline.lock();
        if timeline.epoch.is_none() {
            timeline.epoch = Some(epoch);
        }
    }

    /// Queues a fragment; waits (asynchronously) while the decoder is two fragments behind.
    pub async fn push(&self, fragment: FragmentInput) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Stopped, "the decoder is stopped"))?;
        tx.send(Command::Fragment(fragment))
            .await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))
    }

    /// Queues an access unit (elementary head); waits (asynchronously) while two are queued.
    pub async fn push_unit(&self, unit: UnitInput) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Stopped, "the decoder is stopped"))?;
        tx.send(Command::Unit(unit))
            .await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))
    }

    /// Sends end-of-stream through the pipeline and waits until every frame is out.
    pub async fn finish(&self) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Stopped, "the decoder is stopped"))?;
        let (done, wait) = tokio::sync::oneshot::channel();
        tx.send(Command::Finish(done))
            .await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))?;
        wait.await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))
    }

    /// How many pipelines were built (1 + rebuilds after errors).
    pub fn pipelines_built(&self) -> u64 {
        self.shared.pipelines_built.load(Ordering::Relaxed)
    }

    /// Stops the thread and releases the pipeline. The blocking part (the pipeline to NULL,
    /// which also unblocks a push waiting on a full appsrc, and the thread join) runs on a
    /// thread of its own ([`teardown`](crate::source::teardown)): this returns within a second,
    /// and never blocks a tokio worker.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_finish();
        self.tx.lock().take();
        let pipeline = self.shared.pipeline.lock().clone();
        let thread = self.thread.lock().take();
        if pipeline.is_none() && thread.is_none() {
            return;
        }
        crate::source::teardown("decoder", move || {
            if let Some(pipeline) = pipeline {
                let _ = pipeline.set_state(gst::State::Null);
            }
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        });
    }
}

impl Shared {
    /// Wakes a `Finish` waiting for end-of-stream (stop, or the pipeline failed: either way no
    /// end-of-stream will come).
    fn wake_finish(&self) {
        let _eos = self.eos.0.lock();
        self.eos.1.notify_all();
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) struct Built {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
}

/// What the KVS head plugs for fMP4 H.264/H.265 (through `parsebin` and [`head`]): checked at
/// `build()`.
pub(crate) const KVS_HEAD_ELEMENTS: &[&str] = &[
    "appsrc",
    "parsebin",
    "typefind",
    "qtdemux",
    "h264parse",
    "avdec_h264",
    "h265parse",
    "avdec_h265",
];

pub(super) fn build_pipeline(
    config: &DecodeConfig,
    shared: &Arc<Shared>,
    sink: &Arc<dyn FrameSink>,
) -> Result<Built> {
    let pipeline = gst::Pipeline::with_name(&format!("kvs-frames-{}", config.name));
    let appsrc = gst_app::AppSrc::builder()
        .name("src")
        .format(match shared.head {
            Head::Fmp4 => gst::Format::Bytes,
            Head::Elementary => gst::Format::Time,
        })
        .is_live(false)
        .block(true)
        .max_bytes(16 * 1024 * 1024)
        .build();
    let decode = head::parse_decode_bin("decode")?;
    pipeline
        .add_many([appsrc.upcast_ref::<gst::Element>(), decode.upcast_ref()])
        .map_err(Error::from)?;
    appsrc.link(&decode).map_err(Error::from)?;

    // The fragment by its start on the timeline; producer time = the fragment's program date
    // time + the frame's offset in it (the timeline is kept monotonic when the producer clock
    // steps back, so it is not always program date time − epoch), else epoch + PTS.
    let stamp_shared = Arc::clone(shared);
    let stamp: Stamp = Box::new(move |pts, _reference| {
        let timeline = stamp_shared.timeline.lock();
        let found = pts.and_then(|p| {
            timeline
                .fragments
                .iter()
                .rev()
                .find(|(start, _)| *start <= p + Duration::from_millis(1))
        });
        let producer = match (found, pts) {
            (Some((start, id)), Some(p)) if id.program_date_time.is_some() => id
                .program_date_time
                .and_then(|t| match p.checked_sub(*start) {
                    Some(offset) => t.checked_add(offset),
                    None => t.checked_sub(start.saturating_sub(p)),
                }),
            _ => timeline.epoch.zip(pts).and_then(|(e, p)| e.checked_add(p)),
        };
        (producer, found.map(|(_, id)| id.clone()))
    });
    let eos_shared = Arc::clone(shared);
    add_tail(
        &pipeline,
        decode.upcast_ref(),
        config,
        sink,
        TailHooks {
            stamp,
            on_eos: Box::new(move || {
                *eos_shared.eos.0.lock() = true;
                eos_shared.eos.1.notify_all();
            }),
        },
    )?;

    // Errors from streaming threads: mark the pipeline failed and tell the source.
    let err_shared = Arc::clone(shared);
    let err_sink = Arc::clone(sink);
    on_bus_error(&pipeline, move |err| {
        if !err_shared.stopping.load(Ordering::SeqCst)
            && !err_shared.failed.swap(true, Ordering::SeqCst)
        {
            let error = Error::new(
                ErrorKind::Decode,
                format!(
                    "GStreamer error from {}: {}",
                    error_source(err),
                    err.error()
                ),
            );
            tracing::warn!(%error, debug = %error_debug(err), "decode pipeline failed");
            // The source first learns why, then a Finish waiting for end-of-stream wakes.
            err_sink.error(error);
            err_shared.wake_finish();
        }
    })?;

    pipeline.set_state(gst::State::Playing).map_err(|e| {
        Error::new(
            ErrorKind::Pipeline,
            format!("the decode pipeline does not start: {e}"),
        )
    })?;
    shared.pipelines_built.fetch_add(1, Ordering::Relaxed);
    *shared.pipeline.lock() = Some(pipeline.clone());
    Ok(Built { pipeline, appsrc })
}

pub(super) fn run(
    config: DecodeConfig,
    shared: Arc<Shared>,
    sink: Arc<dyn FrameSink>,
    mut rx: tokio::sync::mpsc::Receiver<Command>,
    first: Built,
) {
    let mut built = Some(first);
    let mut current_init: Option<Bytes> = None;
    let mut current_caps: Option<gst::Caps> = None;
    let mut init_sent = false;
    while let Some(command) = rx.blocking_recv() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let fragment = match command {
            Command::Fragment(f) => f,
            Command::Unit(unit) => {
                match ready(&mut built, &config, &shared, &sink) {
                    None => continue,
                    Some(true) => current_caps = None,
                    Some(false) => {}
                }
                let Some(b) = built.as_ref() else { continue };
                push_unit(b, &shared, unit, &mut current_caps, &config.name);
                continue;
            }
            Command::Finish(done) => {
                if let Some(b) = built.as_ref() {
                    *shared.eos.0.lock() = false;
                    if b.appsrc.end_of_stream().is_ok() {
                        let mut eos = shared.eos.0.lock();
                        let deadline = std::time::Instant::now() + Duration::from_secs(30);
                        while !*eos
                            && !shared.stopping.load(Ordering::SeqCst)
                            && !shared.failed.load(Ordering::SeqCst)
                        {
                            if shared.eos.1.wait_until(&mut eos, deadline).timed_out() {
                                tracing::warn!(source = %config.name, "no end-of-stream from the decoder within 30 s");
                                break;
                            }
                        }
                    }
                }
                let _ = done.send(());
                // The pipeline is spent: the next fragment (if any) gets a new one.
                if let Some(old) = built.take() {
                    let _ = old.pipeline.set_state(gst::State::Null);
                }
                continue;
            }
        };
        match ready(&mut built, &config, &shared, &sink) {
            None => continue,
            Some(true) => init_sent = false,
            Some(false) => {}
        }
        let Some(b) = built.as_ref() else { continue };
        if let Some(init) = &fragment.init
            && (!init_sent || current_init.as_ref() != Some(init))
        {
            if b.appsrc
                .push_buffer(gst::Buffer::from_slice(init.clone()))
                .is_err()
            {
                continue;
            }
            current_init = Some(init.clone());
            init_sent = true;
        }
        {
            let mut timeline = shared.timeline.lock();
            timeline.fragments.push_back((fragment.start, fragment.id));
            while timeline.fragments.len() > 64 {
                timeline.fragments.pop_front();
            }
        }
        if b.appsrc
            .push_buffer(gst::Buffer::from_slice(fragment.data))
            .is_err()
        {
            tracing::debug!(source = %config.name, "appsrc refused a fragment (flushing or failed)");
        }
    }
    if let Some(b) = built.take() {
        let _ = b.appsrc.end_of_stream();
        let _ = b.pipeline.set_state(gst::State::Null);
    }
    *shared.pipeline.lock() = None;
}

/// A working pipeline in `built`: the current one, or a new one after a failure (or a finished
/// stream). `Some(true)` when it was rebuilt (what was sent to the old one must be sent again),
/// `None` when it cannot be built (the source is told).
fn ready(
    built: &mut Option<Built>,
    config: &DecodeConfig,
    shared: &Arc<Shared>,
    sink: &Arc<dyn FrameSink>,
) -> Option<bool> {
    if !shared.failed.load(Ordering::SeqCst) && built.is_some() {
        return Some(false);
    }
    if let Some(old) = built.take() {
        let _ = old.pipeline.set_state(gst::State::Null);
    }
    shared.failed.store(false, Ordering::SeqCst);
    match build_pipeline(config, shared, sink) {
        Ok(b) => {
            tracing::info!(source = %config.name, "decode pipeline rebuilt");
            *built = Some(b);
            Some(true)
        }
        Err(e) => {
            sink.error(e);
            None
        }
    }
}

/// Pushes one access unit: its caps first when they changed, its fragment onto the timeline.
fn push_unit(
    b: &Built,
    shared: &Shared,
    unit: UnitInput,
    current_caps: &mut Option<gst::Caps>,
    name: &str,
) {
    // The same caps object unit after unit (a pointer compare), a structural compare only when
    // a new one comes.
    let same = current_caps
        .as_ref()
        .is_some_and(|c| c.as_ptr() == unit.caps.as_ptr() || *c == unit.caps);
    if !same {
        b.appsrc.set_caps(Some(&unit.caps));
        *current_caps = Some(unit.caps);
    }
    if let Some((start, id)) = unit.fragment {
        let mut timeline = shared.timeline.lock();
        timeline.fragments.push_back((start, id));
        while timeline.fragments.len() > 64 {
            timeline.fragments.pop_front();
        }
    }
    let mut buffer = gst::Buffer::from_slice(unit.data);
    if let Some(buffer) = buffer.get_mut() {
        buffer.set_pts(gst::ClockTime::from_nseconds(
            u64::try_from(unit.pts.as_nanos()).unwrap_or(u64::MAX),
        ));
        if !unit.key {
            buffer.set_flags(gst::BufferFlags::DELTA_UNIT);
        }
    }
    if b.appsrc.push_buffer(buffer).is_err() {
        tracing::debug!(source = %name, "appsrc refused an access unit (flushing or failed)");
    }
}
