//! The fallback provider when no OIDC provider is configured: the local
//! account the kernel saw connect. On a bastion, each person has their own
//! login, so this still names a person; tokens cannot be verified.

use super::{
    IdentityError, IdentityFuture, IdentityProvider, Principal, PrincipalKind, TokenIdentity,
};

pub struct UnixIdentity;

impl UnixIdentity {
    /// Login name of `uid` from /etc/passwd, or the number.
    pub fn user_name(uid: u32) -> String {
        std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|passwd| {
                passwd.lines().find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let id: u32 = fields.nth(1)?.parse().ok()?;
                    (id == uid).then(|| name.to_string())
                })
            })
            .unwrap_or_else(|| uid.to_string())
    }
}

impl IdentityProvider for UnixIdentity {
    fn principal_for_uid(&self, uid: u32) -> IdentityFuture<'_, Option<Principal>> {
        let name = Self::user_name(uid);
        Box::pin(async move {
            Some(Principal {
                subject: format!("unix:{name}"),
                name,
                kind: PrincipalKind::Person,
                roles: Vec::new(),
            })
        })
    }

    fn verify_token<'a>(
        &'a self,
        _token: &'a str,
    ) -> IdentityFuture<'a, Result<TokenIdentity, IdentityError>> {
        Box::pin(async {
            Err(IdentityError::Rejected(
                "token sign-in is not configured on this gateway".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_in_passwd() {
        assert_eq!(UnixIdentity::user_name(0), "root");
    }

    #[tokio::test]
    async fn uid_principal_names_the_login() {
        let p = UnixIdentity.principal_for_uid(0).await.unwrap();
        assert_eq!(p.subject, "unix:root");
        assert!(UnixIdentity.verify_token("x").await.is_err());
    }
}
