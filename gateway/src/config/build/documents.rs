//! Pass 1: every YAML document of every file, sorted by kind.

use serde::Deserialize;

use super::{ApiDoc, BindingDoc, Collector, Doc, ServiceDoc, check_envelope, serde_error, typed};
use crate::config::{ConfigError, LineIndex, raw};

/// The configuration's documents, by kind.
pub(super) struct Documents<'a> {
    pub apis: Vec<ApiDoc<'a>>,
    /// Named Service resources, in file order.
    pub services: Vec<(String, ServiceDoc<'a>)>,
    pub bindings: Vec<BindingDoc<'a>>,
    /// The one Configuration resource, if there is one.
    pub configuration: Option<(Doc<'a>, raw::ConfigurationSpec)>,
    /// Contracts with their names.
    pub contracts: Vec<(Doc<'a>, String, raw::ContractSpec)>,
    /// The gateway cluster's name: the Configuration's `metadata.name`.
    pub cluster: String,
    /// The replica's registration, with its name (connected mode).
    pub registration: Option<(Doc<'a>, String, raw::RegistrationSpec)>,
}

/// The kind of every document of `text`; `None` marks one to skip (empty, or already reported).
fn kinds(file: &str, text: &str, index: &LineIndex, c: &mut Collector) -> Vec<Option<String>> {
    let documents = index.documents().max(1);
    let mut kinds = Vec::new();
    for de in serde_yaml_ng::Deserializer::from_str(text).take(documents) {
        match Option::<raw::Envelope>::deserialize(de) {
            Ok(env) => kinds.push(env.map(|e| e.kind)),
            Err(e) => {
                c.errors.push(serde_error(file, &e));
                // After a syntax error the document stream cannot be trusted (it
                // may repeat the error forever): the first error is enough.
                if !index.syntax_ok() {
                    break;
                }
                kinds.push(None);
            }
        }
    }
    kinds
}

/// Reads every document of `files` (`indexes` locate their fields).
pub(super) fn read<'a>(
    files: &'a [(String, String)],
    indexes: &'a [LineIndex],
    c: &mut Collector,
) -> Documents<'a> {
    let mut docs = Documents {
        apis: Vec::new(),
        services: Vec::new(),
        bindings: Vec::new(),
        configuration: None,
        contracts: Vec::new(),
        cluster: String::from("default"),
        registration: None,
    };
    for ((file, text), index) in files.iter().zip(indexes) {
        let kinds = kinds(file, text, index, c);
        if !index.syntax_ok() {
            if !c.errors.iter().any(|e| &e.file == file) {
                c.errors.push(ConfigError {
                    file: file.clone(),
                    line: 1,
                    column: 1,
                    field: String::new(),
                    message: "not valid YAML".into(),
                });
            }
            continue;
        }
        let documents = index.documents().max(1);
        for (n, de) in serde_yaml_ng::Deserializer::from_str(text)
            .take(documents)
            .enumerate()
        {
            let Some(Some(kind)) = kinds.get(n) else { continue };
            docs.add(Doc { file, index, n }, kind, de, c);
        }
    }
    docs
}

impl<'a> Documents<'a> {
    /// Sorts one document of `kind` in, checking its envelope.
    fn add(&mut self, doc: Doc<'a>, kind: &str, de: serde_yaml_ng::Deserializer<'_>, c: &mut Collector) {
        let file = doc.file;
        match kind {
            "ApiInstance" => {
                if let Some(t) = typed::<raw::ApiInstanceSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    self.apis.push(ApiDoc {
                        doc,
                        name: t.metadata.name,
                        spec: t.spec,
                    });
                }
            }
            "Service" => {
                if let Some(t) = typed::<raw::ServiceSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    self.services.push((t.metadata.name, ServiceDoc { doc, spec: t.spec }));
                }
            }
            "PolicyBinding" => {
                if let Some(t) = typed::<raw::PolicyBindingSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    self.bindings.push(BindingDoc { doc, spec: t.spec });
                }
            }
            "Configuration" => {
                if let Some(t) = typed::<raw::ConfigurationSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    if let Some((first, _)) = &self.configuration {
                        let at = first.at("metadata");
                        c.push(
                            &doc.at("kind"),
                            format!("a second Configuration; the first is at {}:{}", at.file, at.line),
                        );
                    } else {
                        self.cluster.clone_from(&t.metadata.name);
                        self.configuration = Some((doc, t.spec));
                    }
                }
            }
            "Contract" => {
                if let Some(t) = typed::<raw::ContractSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    self.contracts.push((doc, t.metadata.name, t.spec));
                }
            }
            "Registration" => {
                if let Some(t) = typed::<raw::RegistrationSpec>(file, de, &mut c.errors) {
                    check_envelope(&doc, &t.api_version, &t.metadata, c);
                    if let Some((first, _, _)) = &self.registration {
                        let at = first.at("metadata");
                        c.push(
                            &doc.at("kind"),
                            format!("a second Registration; the first is at {}:{}", at.file, at.line),
                        );
                    } else {
                        self.registration = Some((doc, t.metadata.name, t.spec));
                    }
                }
            }
            other => c.push(
                &doc.at("kind"),
                format!(
                    "unknown kind `{other}`; expected ApiInstance, Service, PolicyBinding, Configuration, Contract or Registration"
                ),
            ),
        }
    }
}
