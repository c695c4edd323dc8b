//! A lazily opened connection to one Redis, used by the shared limits and the shared cache:
//! opened at the first call, dropped after a failure and opened again at the next one, with
//! the password read from its file at each connect, so that a rotated Secret is picked up
//! without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo};

#[derive(Debug, thiserror::Error)]
pub enum RedisLinkError {
    #[error("cannot connect to Redis: {0}")]
    Connect(String),
    /// Names the file, never its content.
    #[error("Redis password file {path} cannot be read: {reason}")]
    PasswordFile { path: PathBuf, reason: String },
}

pub struct RedisLink {
    /// None when the URL cannot be used: every call fails as an unreachable Redis would.
    info: Option<ConnectionInfo>,
    password_file: Option<PathBuf>,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
}

impl RedisLink {
    /// `timeout` bounds connecting and each response.
    pub fn new(url: &str, password_file: Option<PathBuf>, timeout: Duration) -> Self {
        Self {
            info: url.into_connection_info().ok(),
            password_file,
            timeout,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The open connection, or a new one.
    pub async fn connection(&self) -> Result<MultiplexedConnection, RedisLinkError> {
        let mut guard = self.connection.lock().await;
        if let Some(connection) = guard.as_ref() {
            return Ok(connection.clone());
        }
        let mut info = self
            .info
            .clone()
            .ok_or_else(|| RedisLinkError::Connect("invalid Redis URL".to_string()))?;
        if let Some(path) = &self.password_file {
            let password = read_password(path)?;
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| RedisLinkError::Connect(e.to_string()))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| RedisLinkError::Connect(e.to_string()))?;
        *guard = Some(connection.clone());
        Ok(connection)
    }

    /// A call failed: the connection is not reused; the next call opens a new one.
    pub fn forget_connection(&self) {
        if let Ok(mut guard) = self.connection.try_lock() {
            *guard = None;
        }
    }
}

fn read_password(path: &Path) -> Result<String, RedisLinkError> {
    let unreadable = |reason: String| RedisLinkError::PasswordFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.kind().to_string()))?;
    let password =
        std::str::from_utf8(bytes.trim_ascii()).map_err(|_| unreadable("not UTF-8".to_string()))?;
    if password.is_empty() {
        return Err(unreadable("empty".to_string()));
    }
    Ok(password.to_string())
}
