//! Decoding the raw instance watch: an object that cannot be decoded is reported and skipped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Resource,
    api::{ApiResource, DynamicObject},
    runtime::{
        events::{Event, EventType, Recorder},
        watcher::{self},
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    api::{ServiceInstance, ServiceInstanceSpec},
    metrics::Metrics,
};

/// Decodes the raw objects of the instance watch. One that cannot be decoded (stored before a
/// schema change, say) is reported once per version (a log line, a Warning Event, the
/// `roster_undecodable_instances` gauge) and skipped; the rest of the watch goes on.
pub(super) struct Decoder {
    /// uid → resourceVersion of the objects that failed, as reported.
    pub(super) bad: Mutex<HashMap<String, String>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) report: futures::channel::mpsc::UnboundedSender<(ObjectReference, String)>,
}

impl Decoder {
    pub(super) fn decode(
        &self,
        event: std::result::Result<watcher::Event<DynamicObject>, watcher::Error>,
    ) -> Option<std::result::Result<watcher::Event<ServiceInstance>, watcher::Error>> {
        let event = match event {
            Ok(event) => event,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(match event {
            watcher::Event::Init => watcher::Event::Init,
            watcher::Event::InitDone => watcher::Event::InitDone,
            watcher::Event::InitApply(obj) => watcher::Event::InitApply(self.one(obj)?),
            watcher::Event::Apply(obj) => watcher::Event::Apply(self.one(obj)?),
            watcher::Event::Delete(obj) => {
                let metadata = obj.metadata.clone();
                let forgotten = metadata
                    .uid
                    .as_ref()
                    .is_some_and(|uid| self.bad_set().remove(uid).is_some());
                if forgotten {
                    self.metrics.set_undecodable(self.bad_set().len());
                }
                // Its spec does not matter for a deletion: only who it was.
                let si = obj.try_parse::<ServiceInstance>().unwrap_or_else(|_| {
                    let mut si = ServiceInstance::new("", ServiceInstanceSpec::new("", "", vec![]));
                    si.metadata = metadata;
                    si
                });
                watcher::Event::Delete(si)
            }
        }))
    }

    pub(super) fn bad_set(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.bad.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn one(&self, obj: DynamicObject) -> Option<ServiceInstance> {
        let reference = obj.object_ref(&ApiResource::erase::<ServiceInstance>(&()));
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let version = obj.metadata.resource_version.clone().unwrap_or_default();
        match obj.try_parse::<ServiceInstance>() {
            Ok(si) => {
                if self.bad_set().remove(&uid).is_some() {
                    self.metrics.set_undecodable(self.bad_set().len());
                }
                Some(si)
            }
            Err(e) => {
                let previous = self.bad_set().insert(uid, version.clone());
                self.metrics.set_undecodable(self.bad_set().len());
                if previous.as_deref() != Some(version.as_str()) {
                    let message = e.to_string();
                    tracing::warn!(
                        namespace = reference.namespace.as_deref().unwrap_or_default(),
                        name = reference.name.as_deref().unwrap_or_default(),
                        error = %message,
                        "cannot decode a ServiceInstance; skipping it until it is fixed or deleted"
                    );
                    let _ = self.report.unbounded_send((reference, message));
                }
                None
            }
        }
    }
}

/// Publishes a Warning Event on each instance that cannot be decoded. Only a leader writes
/// Events: a standby keeps what it found (the latest report per object) and publishes it when
/// it leads.
pub(super) async fn report_undecodable(
    mut reports: futures::channel::mpsc::UnboundedReceiver<(ObjectReference, String)>,
    recorder: Recorder,
    views: std::sync::Arc<super::views::Views>,
    shutdown: CancellationToken,
) {
    let mut leading = views.term.subscribe();
    let mut waiting: HashMap<Option<String>, (ObjectReference, String)> = HashMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            report = reports.next() => match report {
                Some((reference, message)) => {
                    waiting.insert(reference.uid.clone(), (reference, message));
                }
                None => return,
            },
            changed = leading.changed() => if changed.is_err() { return },
        }
        if leading.borrow_and_update().is_none() {
            continue;
        }
        for (_, (reference, message)) in waiting.drain() {
            let event = Event {
                type_: EventType::Warning,
                reason: "Undecodable".into(),
                note: Some(undecodable_note(&message)),
                action: "Decode".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "cannot publish Event");
            }
        }
    }
}

/// The Event's note, within the 1 kB an Event note may hold.
fn undecodable_note(message: &str) -> String {
    let mut note = format!(
        "Roster cannot read this ServiceInstance (stored before a schema change?) and skips \
         it until it is fixed or deleted: {message}"
    );
    if note.len() > 1000 {
        let mut end = 1000;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
    }
    note
}
