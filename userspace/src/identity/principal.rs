//! From verified claims to a [`Principal`]: subject, display name, person
//! or service account, and gateway roles from the provider's groups.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{verify::Claims, IdentityConfig, Principal, PrincipalKind};

/// Claims that name the OAuth client a token was issued to, by provider:
/// `client_id` (RFC 9068), `azp` (OIDC), `cid` (Okta).
const CLIENT_CLAIMS: [&str; 3] = ["client_id", "azp", "cid"];

pub struct PrincipalRules {
    issuer: String,
    groups_claim: String,
    roles: BTreeMap<String, Vec<String>>,
    service_claim: Option<(String, Option<String>)>,
}

impl PrincipalRules {
    pub fn new(config: &IdentityConfig) -> Self {
        Self {
            issuer: config.issuer.clone(),
            groups_claim: config.groups_claim.clone(),
            roles: config.roles.clone(),
            service_claim: config.service_rule(),
        }
    }

    pub fn principal(&self, claims: &Claims) -> Principal {
        let sub = claims.subject().as_str();
        let kind = if self.is_service(claims) {
            PrincipalKind::Service
        } else {
            PrincipalKind::Person
        };
        let name = match kind {
            PrincipalKind::Service => self.client_of(claims).unwrap_or(sub).to_string(),
            PrincipalKind::Person => claims
                .email()
                .map(|e| e.to_string())
                .or_else(|| claims.preferred_username().map(|u| u.to_string()))
                .or_else(|| {
                    claims
                        .name()
                        .and_then(|n| n.get(None))
                        .map(|n| n.to_string())
                })
                .unwrap_or_else(|| sub.to_string()),
        };
        let groups = self.groups(claims);
        let roles = self
            .roles
            .iter()
            .filter(|(_, granted_by)| granted_by.iter().any(|g| groups.contains(g)))
            .map(|(role, _)| role.clone())
            .collect();
        Principal {
            // An issuer URL has no fragment, so '#' cannot be ambiguous.
            subject: format!("{}#{sub}", self.issuer),
            name,
            kind,
            roles,
        }
    }

    /// The service-account rule: a token is a machine's when no person is
    /// its subject, i.e. its `sub` is the client it was issued to
    /// (`client_id`, `azp` or `cid` equal to `sub`, as client-credentials
    /// tokens are at RFC 9068 providers, Okta and oidc-provider), or when it
    /// carries the configured `service_claim` (for providers that give
    /// service principals their own subject ids, e.g. Entra ID `idtyp=app`,
    /// Keycloak `client_id`).
    fn is_service(&self, claims: &Claims) -> bool {
        let sub = claims.subject().as_str();
        if self.client_of(claims) == Some(sub) {
            return true;
        }
        let Some((claim, wanted)) = &self.service_claim else {
            return false;
        };
        match (claims.additional_claims().claims.get(claim), wanted) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(Value::String(found)), Some(wanted)) => found == wanted,
            (Some(found), Some(wanted)) => {
                serde_json::from_str::<Value>(wanted).is_ok_and(|w| w == *found)
            }
        }
    }

    fn client_of<'c>(&self, claims: &'c Claims) -> Option<&'c str> {
        if let Some(azp) = claims.authorized_party() {
            if azp.as_str() == claims.subject().as_str() {
                return Some(azp.as_str());
            }
        }
        let other = &claims.additional_claims().claims;
        CLIENT_CLAIMS
            .iter()
            .find_map(|name| other.get(*name).and_then(Value::as_str))
            .or_else(|| claims.authorized_party().map(|a| a.as_str()))
    }

    /// Groups from the configured claim: an array of strings or one string;
    /// a dotted name (`realm_access.roles`) walks into objects when no claim
    /// has that literal name.
    fn groups(&self, claims: &Claims) -> Vec<String> {
        let other = &claims.additional_claims().claims;
        let value = other.get(&self.groups_claim).or_else(|| {
            let mut parts = self.groups_claim.split('.');
            let first = other.get(parts.next()?)?;
            parts.try_fold(first, |v, part| v.get(part))
        });
        match value {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
            Some(Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: serde_json::Value) -> Claims {
        serde_json::from_value(json).unwrap()
    }

    fn rules(service_claim: Option<&str>) -> PrincipalRules {
        let config: IdentityConfig = toml::from_str(&format!(
            "issuer = \"https://idp.example\"\nclient_id = \"portcullis\"\n{}\n[roles]\nengineers = [\"eng\"]\ndba = [\"db-admins\", \"dba\"]\nauditors = [\"audit\"]\n",
            service_claim.map_or(String::new(), |s| format!("service_claim = \"{s}\""))
        ))
        .unwrap();
        PrincipalRules::new(&config)
    }

    fn base(extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "iss": "https://idp.example", "aud": "portcullis", "exp": 2000000000, "iat": 1700000000
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    }

    #[test]
    fn person_with_groups_gets_roles_and_email_name() {
        let p = rules(None).principal(&claims(base(serde_json::json!({
            "sub": "alice", "email": "alice@example.test", "groups": ["eng", "db-admins", "other"]
        }))));
        assert_eq!(p.subject, "https://idp.example#alice");
        assert_eq!(p.name, "alice@example.test");
        assert_eq!(p.kind, PrincipalKind::Person);
        assert_eq!(p.roles, ["dba", "engineers"]);
    }

    #[test]
    fn client_credentials_token_is_a_service() {
        let p = rules(None).principal(&claims(base(serde_json::json!({
            "sub": "svc-reporting", "client_id": "svc-reporting"
        }))));
        assert_eq!(p.kind, PrincipalKind::Service);
        assert_eq!(p.name, "svc-reporting");
        assert!(p.roles.is_empty());
    }

    #[test]
    fn person_token_issued_to_a_client_stays_a_person() {
        let p = rules(None).principal(&claims(base(serde_json::json!({
            "sub": "alice", "client_id": "portcullis", "azp": "portcullis"
        }))));
        assert_eq!(p.kind, PrincipalKind::Person);
        assert_eq!(p.name, "alice");
    }

    #[test]
    fn configured_service_claim_marks_machines() {
        let token = base(serde_json::json!({"sub": "3f2a", "azp": "app-1", "idtyp": "app"}));
        let p = rules(Some("idtyp=app")).principal(&claims(token.clone()));
        assert_eq!(p.kind, PrincipalKind::Service);
        assert_eq!(p.name, "app-1");
        assert_eq!(
            rules(None).principal(&claims(token)).kind,
            PrincipalKind::Person
        );
        let presence = base(serde_json::json!({"sub": "3f2a", "client_id": "etl"}));
        assert_eq!(
            rules(Some("client_id")).principal(&claims(presence)).kind,
            PrincipalKind::Service
        );
    }

    #[test]
    fn nested_and_single_string_groups() {
        let mut r = rules(None);
        r.groups_claim = "realm_access.roles".into();
        let p = r.principal(&claims(base(serde_json::json!({
            "sub": "bob", "realm_access": {"roles": ["audit"]}
        }))));
        assert_eq!(p.roles, ["auditors"]);
        let p = rules(None).principal(&claims(base(
            serde_json::json!({"sub": "c", "groups": "eng"}),
        )));
        assert_eq!(p.roles, ["engineers"]);
    }
}
