//! What a redeploy changes: services (and top-level volumes and networks) to
//! create, update and remove, and for each update the fields that differ.
//!
//! This is the basis of "redeploying a changed file updates only what
//! changed" and of `gantry deploy --dry-run`. Field lists come from
//! destructuring [`Service`] and [`Deploy`], so a field added to either
//! cannot be forgotten here: the code stops compiling.

use std::collections::BTreeMap;

use serde::Serialize;

use super::spec::{Deploy, Service, Stack};

/// The changes from one stack to another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StackChanges {
    /// Services only in the new stack, by name.
    pub create: Vec<String>,
    /// Services in both that differ.
    pub update: Vec<ServiceUpdate>,
    /// Services only in the old stack, by name.
    pub remove: Vec<String>,
    /// Top-level volumes.
    pub volumes: ObjectChanges,
    /// Top-level networks.
    pub networks: ObjectChanges,
}

impl StackChanges {
    /// Whether a deploy would change nothing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.update.is_empty()
            && self.remove.is_empty()
            && self.volumes.is_empty()
            && self.networks.is_empty()
    }
}

/// A changed service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceUpdate {
    /// The service.
    pub service: String,
    /// Changed fields, in declaration order; `deploy` is split into its
    /// parts (`deploy.replicas`, `deploy.resources`, …).
    pub fields: Vec<String>,
}

impl ServiceUpdate {
    /// Whether only the replica count changed: a scale, which needs no new
    /// tasks for existing slots.
    pub fn is_scale_only(&self) -> bool {
        self.fields == ["deploy.replicas"]
    }
}

/// Named objects created, changed or removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ObjectChanges {
    /// Only in the new stack.
    pub create: Vec<String>,
    /// In both, different.
    pub update: Vec<String>,
    /// Only in the old stack.
    pub remove: Vec<String>,
}

impl ObjectChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// Compares two stacks. The stack name is not compared: the caller decides
/// which deployed stack a file is compared with.
pub fn diff(old: &Stack, new: &Stack) -> StackChanges {
    let mut changes = StackChanges::default();
    for (name, service) in &new.services {
        match old.services.get(name) {
            None => changes.create.push(name.clone()),
            Some(before) => {
                let fields = service_fields(before, service);
                if !fields.is_empty() {
                    changes.update.push(ServiceUpdate {
                        service: name.clone(),
                        fields,
                    });
                }
            }
        }
    }
    changes.remove = removed(&old.services, &new.services);
    changes.volumes = objects(&old.volumes, &new.volumes);
    changes.networks = objects(&old.networks, &new.networks);
    changes
}

fn removed<T>(old: &BTreeMap<String, T>, new: &BTreeMap<String, T>) -> Vec<String> {
    old.keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect()
}

fn objects<T: PartialEq>(old: &BTreeMap<String, T>, new: &BTreeMap<String, T>) -> ObjectChanges {
    let mut out = ObjectChanges::default();
    for (name, spec) in new {
        match old.get(name) {
            None => out.create.push(name.clone()),
            Some(before) if before != spec => out.update.push(name.clone()),
            Some(_) => {}
        }
    }
    out.remove = removed(old, new);
    out
}

fn service_fields(old: &Service, new: &Service) -> Vec<String> {
    let Service {
        image,
        command,
        entrypoint,
        environment,
        ports,
        volumes,
        healthcheck,
        user,
        working_dir,
        hostname,
        labels,
        stop_grace_period,
        deploy,
        network_mode,
        depends_on,
        networks,
    } = new;
    let mut fields = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {
            $(
                if old.$field != *$field {
                    fields.push(stringify!($field).to_string());
                }
            )*
        };
    }
    compare!(
        image,
        command,
        entrypoint,
        environment,
        ports,
        volumes,
        healthcheck,
        user,
        working_dir,
        hostname,
        labels,
        stop_grace_period
    );
    fields.extend(deploy_fields(&old.deploy, deploy));
    compare!(network_mode, depends_on, networks);
    fields
}

fn deploy_fields(old: &Deploy, new: &Deploy) -> Vec<String> {
    let Deploy {
        mode,
        replicas,
        resources,
        restart_policy,
        placement,
        update_config,
        endpoint_mode,
    } = new;
    let mut fields = Vec::new();
    macro_rules! compare {
        ($($field:ident),*) => {
            $(
                if old.$field != *$field {
                    fields.push(concat!("deploy.", stringify!($field)).to_string());
                }
            )*
        };
    }
    compare!(
        mode,
        replicas,
        resources,
        restart_policy,
        placement,
        update_config,
        endpoint_mode
    );
    fields
}
